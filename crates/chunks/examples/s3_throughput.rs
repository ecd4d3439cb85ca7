//! Download throughput of a chunked file from S3 at several concurrencies.
//! `HATCH_S3_*` as for the daemon; `cargo run --release -p hatch-chunks
//! --example s3_throughput -- FILE [CONCURRENCY...]`.

use std::time::Instant;

use hatch_chunks::{ChunkStore, s3};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let file = std::path::PathBuf::from(args.next().ok_or("usage: s3_throughput FILE [N...]")?);
    let levels: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let store = s3::connect(&s3::S3Settings {
        endpoint: env("HATCH_S3_ENDPOINT"),
        bucket: env("HATCH_S3_BUCKET"),
        region: env("HATCH_S3_REGION"),
        access_key_id: env("HATCH_S3_ACCESS_KEY_ID"),
        secret_access_key: env("HATCH_S3_SECRET_ACCESS_KEY"),
    })?;
    let t0 = Instant::now();
    let (chunks, report) = ChunkStore::new(store.clone(), "throughput/")
        .upload_file(&file)
        .await?;
    println!("upload: {report:?} in {:?}", t0.elapsed());
    let out = std::env::temp_dir().join("s3_throughput.out");
    for n in if levels.is_empty() { vec![16] } else { levels } {
        let cs = ChunkStore::new(store.clone(), "throughput/").with_concurrency(n);
        let _ = std::fs::remove_file(&out);
        let t0 = Instant::now();
        let r = cs.download_file(&chunks, &out).await?;
        let s = t0.elapsed().as_secs_f64();
        println!(
            "concurrency {n}: {} MB in {s:.3} s = {:.0} MB/s",
            r.fetched_bytes / 1_000_000,
            r.fetched_bytes as f64 / 1e6 / s
        );
    }
    Ok(())
}
