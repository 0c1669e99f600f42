from workers.attention import group_by_length


def test_group_by_length_splits_on_ratio_with_min_size():
    lens = [10, 11, 12, 13, 14, 15, 16, 17, 30, 31, 32, 33, 34, 35, 36, 37, 100]
    # A run closes once it has min_group members and the next length exceeds 1.5x its first.
    assert group_by_length(lens) == [8, 8, 1]
    assert group_by_length(lens, min_group=4) == [6, 4, 6, 1]
    assert group_by_length(lens, min_group=20) == [17]
    assert group_by_length([]) == []
    assert group_by_length([5] * 20) == [20]
