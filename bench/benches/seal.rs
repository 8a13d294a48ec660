//! The peer cipher on its own (issue 13): seal and open of one full record
//! (65,519 plaintext bytes) with each Noise cipher snow offers, and the
//! product's `SealedWriter` -> `SealedReader` stream over memory (the
//! record framing and copies included, no socket). Throughput in bytes of
//! plaintext. `cargo bench -p sluice-bench --bench seal`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_replicator::secure::{SealedReader, SealedWriter, NOISE_PARAMS, RECORD_PLAIN_MAX};
use std::io::{Read, Write};
use std::sync::Arc;

/// Both ends of a finished NNpsk0 handshake with `params`, in memory.
fn pair(params: &str) -> (snow::StatelessTransportState, snow::StatelessTransportState) {
    let p: snow::params::NoiseParams = params.parse().expect("noise parameters");
    let key = [7u8; 32];
    let mut i = snow::Builder::new(p.clone())
        .psk(0, &key)
        .build_initiator()
        .expect("initiator");
    let mut r = snow::Builder::new(p)
        .psk(0, &key)
        .build_responder()
        .expect("responder");
    let (mut m, mut out) = (vec![0u8; 65535], vec![0u8; 65535]);
    let n = i.write_message(&[], &mut m).expect("message 1");
    r.read_message(&m[..n], &mut out).expect("read 1");
    let n = r.write_message(&[], &mut m).expect("message 2");
    i.read_message(&m[..n], &mut out).expect("read 2");
    (
        i.into_stateless_transport_mode()
            .expect("initiator transport"),
        r.into_stateless_transport_mode()
            .expect("responder transport"),
    )
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("record seal+open");
    g.throughput(Throughput::Bytes(RECORD_PLAIN_MAX as u64));
    let plain = vec![0x5au8; RECORD_PLAIN_MAX];
    for params in [
        "Noise_NNpsk0_25519_AESGCM_BLAKE2s",
        "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
    ] {
        let (i, r) = pair(params);
        let (mut sealed, mut opened) = (vec![0u8; 65535], vec![0u8; 65535]);
        let mut nonce = 0u64;
        let cipher = params.split('_').nth(3).unwrap_or(params);
        g.bench_function(cipher, |b| {
            b.iter(|| {
                let n = i.write_message(nonce, &plain, &mut sealed).expect("seal");
                r.read_message(nonce, &sealed[..n], &mut opened)
                    .expect("open");
                nonce += 1;
            })
        });
    }
    g.finish();
}

fn stream(c: &mut Criterion) {
    const LEN: usize = 16 << 20;
    let mut g = c.benchmark_group("sealed stream 16 MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(20);
    let data = vec![0xa5u8; LEN];
    let mut back = vec![0u8; 256 << 10];
    g.bench_function(NOISE_PARAMS, |b| {
        b.iter(|| {
            // A fresh session per iteration: the nonces start at 0 on both.
            let (i, r) = pair(NOISE_PARAMS);
            let mut wire = Vec::with_capacity(LEN + LEN / 64);
            let mut w = SealedWriter::new(&mut wire, Arc::new(i));
            for chunk in data.chunks(128 << 10) {
                w.write_all(chunk).expect("write");
            }
            w.flush().expect("flush");
            drop(w);
            let mut rd = SealedReader::new(&wire[..], Arc::new(r));
            let mut total = 0;
            loop {
                let n = rd.read(&mut back).expect("read");
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, LEN);
        })
    });
    g.finish();
}

criterion_group!(benches, records, stream);
criterion_main!(benches);
