//! Criterion micro-benchmark of the coalescer over 1 GiB of 4 KiB pages.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig_transport::{CoalesceConfig, Coalescer, PageBitmap};
use rand::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let pages = 262_144; // 1 GiB
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut random = PageBitmap::new(pages);
    for p in 0..pages {
        if rng.gen_bool(0.5) {
            random.set(p);
        }
    }
    let full = PageBitmap::full(pages);
    let co = Coalescer::new(CoalesceConfig::default()).unwrap();
    let mut g = c.benchmark_group("coalesce_1GiB");
    g.throughput(Throughput::Elements(pages as u64));
    let mut out = Vec::new();
    g.bench_function("random_50pct", |b| {
        b.iter(|| {
            out.clear();
            co.coalesce(&random, &mut out)
        })
    });
    g.bench_function("full", |b| {
        b.iter(|| {
            out.clear();
            co.coalesce(&full, &mut out)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
