# Shortcuts for the commands in the README. `just --list` shows them all.

# Run the demo: a source and a mirror on this machine, no setup.
demo:
    cargo run --release -p xmirror -- demo

# Run every test (the README's test command, what CI runs).
test:
    cargo nextest run --workspace && cargo test --workspace --doc

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# CI exactly as it runs on a fresh clone.
ci:
    bash .ci/run

# Development certificates for one cluster in certs/: a CA, a source, an observer, a client.
certs cluster="dev":
    cargo run -p xmirror -- certs init --dir certs --cluster-id {{cluster}}
    cargo run -p xmirror -- certs issue --dir certs --cluster-id {{cluster}} --role source --name source-1
    cargo run -p xmirror -- certs issue --dir certs --cluster-id {{cluster}} --role observer --name mirror-1
    cargo run -p xmirror -- certs issue --dir certs --cluster-id {{cluster}} --role client --name ops

# The deterministic simulator's long search: N seeds from FIRST (CI runs 1,000 from 0).
sim n="100000" first="1000000":
    XMIRROR_SIM_SEEDS={{n}} XMIRROR_SIM_FIRST={{first}} cargo test -p xmirror-sim --test seeds -- --nocapture

# The fault-injection suite with many more iterations (200 mirror kills, 30 source kills).
chaos:
    cargo build -p xmirror
    XMIRROR_CHAOS=long cargo nextest run --profile chaos -p xmirror-e2e --test faults --no-capture --test-threads 1

# The disaster-recovery drill's long run: 50 rounds of failover, failback by rewind and
# planned promotion back (CI runs 5).
dr-drill rounds="50":
    cargo build -p xmirror
    XMIRROR_DR_ROUNDS={{rounds}} cargo nextest run --profile chaos -p xmirror-e2e --test failover --no-capture

# Fuzz the frame decoder, hello validation and client request decoding, SECONDS each
# (installs cargo-fuzz if missing; `-s none` works on the stable toolchain).
fuzz seconds="600":
    cargo fuzz --version || cargo install cargo-fuzz --locked
    cd fuzz && cargo fuzz run -s none frame_decoder -- -max_total_time={{seconds}}
    cd fuzz && cargo fuzz run -s none hello_validation -- -max_total_time={{seconds}}
    cd fuzz && cargo fuzz run -s none client_request -- -max_total_time={{seconds}}

# Benchmarks (release build): transport and store ceilings, snapshot, lag, catch-up,
# fan-out, Redis side by side, a 100 ms RTT link. Writes bench/results.json and a table.
# Installs Redis from Debian's packages if it is missing. `just bench --quick` for a short run.
bench *args:
    command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
    cargo run --release -p xmirror-bench -- {{args}}
