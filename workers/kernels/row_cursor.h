// RowCursor: a paged KV cache's rows of one sequence in token order (decode_attention.h,
// attend_avx2.h, attend_avx512.h).
#pragma once

#include <cstdint>

namespace flotilla {

// A sequence's cache rows in token order, one step at a time: the block-table lookup happens
// once per block, not once per token (a division and a dependent load per token cost as much
// as the token's arithmetic).
template <typename raw_t>
struct RowCursor {
  const raw_t* base;
  const int32_t* table;
  int64_t bs, row_stride, col, len, pos, off;
  const raw_t* row;  // token pos's row at column col (undefined once pos == len)
  RowCursor(const raw_t* base_, const int32_t* table_, int64_t bs_, int64_t row_stride_,
            int64_t col_, int64_t pos_, int64_t len_)
      : base(base_), table(table_), bs(bs_), row_stride(row_stride_), col(col_), len(len_),
        pos(pos_), off(pos_ % bs_), row(nullptr) {
    if (pos < len) row = block_row(pos / bs) + off * row_stride;
  }
  const raw_t* block_row(int64_t blk) const {
    return base + static_cast<int64_t>(table[blk]) * bs * row_stride + col;
  }
  void next() {
    ++pos;
    row += row_stride;
    if (++off == bs) {
      off = 0;
      if (pos < len) row = block_row(pos / bs);
    }
  }
};

}  // namespace flotilla
