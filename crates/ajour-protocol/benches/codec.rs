//! Codec hot paths: decoding a status, encoding a Write.
//! Run: `cargo bench -p ajour-protocol --bench codec`.

use ajour_protocol::{decode_status, encode_command_into, encode_status, Command, Encoding, Status};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn decode(c: &mut Criterion) {
    let status = Status::updating(b"0.1.0".to_vec(), Some(512), Some(7), b"0.2.0".to_vec(), 65536);
    let mut group = c.benchmark_group("decode_status");
    group.throughput(Throughput::Elements(1));
    for (name, encoding) in [("packed", Encoding::Packed), ("named", Encoding::Named)] {
        let bytes = encode_status(&status, encoding);
        group.bench_function(name, |b| b.iter(|| decode_status(black_box(&bytes)).unwrap()));
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_write");
    for size in [512usize, 4096] {
        let data = vec![0xa5u8; size];
        let command = Command::Write {
            version: b"0.2.0",
            correlation_id: Some(7),
            offset: 65536,
            data: &data,
        };
        let mut out = Vec::with_capacity(size + 64);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(size), &command, |b, command| {
            b.iter(|| {
                out.clear();
                encode_command_into(black_box(command), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
