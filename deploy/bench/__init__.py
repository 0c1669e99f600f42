"""`flotilla bench`: a serving benchmark for Flotilla's gRPC API or any OpenAI-compatible HTTP
server (so one command measures Flotilla and a peer such as vLLM alike).

    workloads.py    seeded request generators (random, long-mix, shared-prefix chat)
    clients.py      endpoint parsing + the Client protocol; grpc_client.py, http_client.py
    runner.py       closed-loop (concurrency) and open-loop (Poisson rate) load generation
    metrics.py      TTFT / ITL / TPOT / E2E percentiles, throughput, goodput under SLOs
    report.py       results.json, PNG plots, the text table
    cli.py          the command line (registered into deploy.cli as `flotilla bench`)
"""
