//! Codec cost per event, in this process: encode, `decode_lazy` (envelope read, body checked,
//! what every consumer delivery pays) and a full `decode`, for the 300-byte `MessageReceived`
//! of `bus_throughput` and for a chat text message as the edge publishes it. No broker.
//! `cargo bench --bench codec`; `make bench` runs it first.
//!
//! Env: NEXUS_BENCH_EVENTS (events per measurement, default 200000), NEXUS_BENCH_ROUNDS (5).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexus::events::{decode, decode_lazy, encode, Event};

mod common;

// The allocator of the `nexus` binary, as in the other benches.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The bus benchmark's event (with a trace context, as an edge publishes it).
fn bus_event(i: usize) -> Event {
    common::bus_event(i as u64).1
}

/// A short customer line with the fields the chat edge sets.
fn chat_event(i: usize) -> Event {
    let body = serde_json::json!({
        "message_id": uuid::Uuid::now_v7().to_string(),
        "channel": "WEB_CHAT",
        "participant_id": format!("customer-{i}"),
        "participant_kind": "CUSTOMER",
        "kind": "TEXT",
        "text": "Hello, I need help with my order",
        "client_message_id": format!("m-{i}"),
    });
    let serde_json::Value::Object(body) = body else {
        unreachable!("literal object")
    };
    Event::new(
        "MessageReceived",
        "tenant-1",
        uuid::Uuid::now_v7().to_string(),
        "edge",
        body,
    )
}

/// Best of `rounds` runs of `f` over `n` items, as ns per item.
fn best(rounds: usize, n: usize, mut f: impl FnMut() -> Duration) -> f64 {
    (0..rounds)
        .map(|_| f())
        .min()
        .map_or(0.0, |d| d.as_nanos() as f64 / n as f64)
}

/// One pass of each measured phase over all the events, never inlined, so that callgrind counts
/// a phase alone: `valgrind --tool=callgrind --toggle-collect='codec::decode_lazy_all'
/// --dump-before='codec::measure' target/release/deps/codec-*` with `NEXUS_BENCH_EVENTS=2000
/// NEXUS_BENCH_ROUNDS=1` gives instructions per event of `decode_lazy` plus dropping the event,
/// one dump per event kind (the count is the same on every run of the same binary).
#[inline(never)]
fn encode_all(events: &[Event]) {
    for e in events {
        black_box(encode(black_box(e)).expect("encode"));
    }
}

#[inline(never)]
fn decode_lazy_all(payloads: &[Bytes]) {
    for p in payloads {
        black_box(decode_lazy(black_box(p)).expect("decode"));
    }
}

#[inline(never)]
fn decode_all(payloads: &[Bytes]) {
    for p in payloads {
        black_box(decode(black_box(p)).expect("decode"));
    }
}

/// Time of one call of `f`.
fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

#[inline(never)]
fn measure(name: &str, make: fn(usize) -> Event, n: usize, rounds: usize) {
    let events: Vec<Event> = (0..n).map(make).collect();
    let payloads: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(encode(e).expect("encode")))
        .collect();
    let size = payloads.first().map_or(0, Bytes::len);
    let enc = best(rounds, n, || timed(|| encode_all(&events)));
    let lazy = best(rounds, n, || timed(|| decode_lazy_all(&payloads)));
    let full = best(rounds, n, || timed(|| decode_all(&payloads)));
    println!(
        "{name:<16} {size:>4} bytes   encode {enc:>6.0} ns   decode_lazy {lazy:>6.0} ns   decode {full:>6.0} ns"
    );
}

fn main() {
    let n = env_or("NEXUS_BENCH_EVENTS", 200_000);
    let rounds = env_or("NEXUS_BENCH_ROUNDS", 5).max(1);
    println!("codec, best of {rounds} rounds of {n} events, ns per event:");
    measure("bus event", bus_event, n, rounds);
    measure("chat message", chat_event, n, rounds);
}
