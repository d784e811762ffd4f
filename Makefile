# nexus: the commands a developer and CI use. `make test` starts what the tests need.
CARGO ?= cargo
SERVICES := bash scripts/services.sh

.PHONY: run build image test lint bench services services-stop clean-data

## Everything in one process on the embedded bus (http://127.0.0.1:8080).
run:
	$(CARGO) run --release -- dev

build:
	$(CARGO) build --all-targets

## The one image every pod runs (needs Docker with BuildKit); IMAGE=repo:tag to name it.
IMAGE ?= nexus:dev
image:
	docker build -f scripts/Dockerfile -t $(IMAGE) .

## Starts Kafka (Tansu), NATS 2.14, PostgreSQL and Redis as needed, then the whole suite.
test: services
	eval "$$($(SERVICES) env)" && $(CARGO) test --lib --bins --tests --no-fail-fast -- --test-threads=6

## fmt + clippy, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## The codec's cost per event (encode, decode); throughput of the nexus bus against the raw clients, side by side on the same brokers; then
## chat load (customer send → agent receive latency over WebSockets, against the bus's own p99), on
## `nexus dev` and on edge + worker processes over NATS JetStream, Redis and PostgreSQL; webhook fan-out
## (events → signed deliveries with the PostgreSQL attempt log, against a plain HTTP client).
bench: services
	eval "$$($(SERVICES) env)" && $(CARGO) bench --bench codec && $(CARGO) bench --bench bus_throughput && $(CARGO) bench --bench chat_load \
	  && NEXUS_BENCH_BUS=nats://127.0.0.1:14222 $(CARGO) bench --bench chat_load \
	  && $(CARGO) bench --bench webhook_fanout

services:
	$(SERVICES) start

services-stop:
	$(SERVICES) stop

clean-data:
	rm -rf .nexus
