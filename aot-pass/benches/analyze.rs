//! Analysis throughput (bytes of code per second, clusters included) on generated
//! ELF images: with symbols (traversal) and stripped (chunked linear sweep).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use avex_aot::{analyze_bytes, synth, ExitPolicy, TranslatorConfig};

fn bench(c: &mut Criterion) {
    let policy = ExitPolicy::default();
    let config = TranslatorConfig::default();
    let mut g = c.benchmark_group("analyze");
    g.sample_size(10);
    for (bits, symbols) in [(64, true), (64, false), (32, false)] {
        // 8 MiB of code, one driver-like function in 20.
        let img = synth::elf(bits, 8 << 20, 20, symbols);
        g.throughput(Throughput::Bytes(8 << 20));
        let id = format!("{bits}bit-{}", if symbols { "symbols" } else { "stripped" });
        g.bench_with_input(BenchmarkId::from_parameter(id), &img, |b, img| {
            b.iter(|| analyze_bytes("bench", img, &policy, &config).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
