//! The whole per-block cost on one core: decode a status, decide, encode the command.
//! Run: `cargo bench -p ajour-engine --bench engine`.

use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
use ajour_protocol::{decode_status, encode_command_into, encode_status, Encoding, Status};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn per_block(c: &mut Criterion) {
    let image = FirmwareImage::new("0.2.0", vec![0x5au8; 1024 * 1024]).unwrap();
    let config = EngineConfig::default();
    let mut group = c.benchmark_group("status_to_write");
    for mtu in [512u32, 4096] {
        let status = encode_status(
            &Status::updating(b"0.1.0".to_vec(), Some(mtu), Some(7), b"0.2.0".to_vec(), 65536),
            Encoding::Packed,
        );
        let mut out = Vec::with_capacity(mtu as usize + 64);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(mtu), &status, |b, bytes| {
            b.iter(|| {
                let status = decode_status(black_box(bytes)).unwrap();
                let decision = decide(&status, Target::Ready(&image), &config);
                out.clear();
                encode_command_into(&decision.command, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();

    let status = Status::updating(b"0.1.0".to_vec(), Some(512), None, b"0.2.0".to_vec(), 65536);
    c.bench_function("decide_only", |b| {
        b.iter(|| black_box(decide(black_box(&status), Target::Ready(&image), &config).outcome))
    });
}

criterion_group!(benches, per_block);
criterion_main!(benches);
