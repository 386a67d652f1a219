//! Health, readiness and Prometheus metrics.

use crate::support::*;
use ajour_protocol::{encode_status, Encoding, Status};
use serde_json::json;

/// The value of the first sample of `metric` whose line contains all of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> f64 {
    // The sum over every series with these labels: the recorder is process-wide, and other tests
    // running meanwhile add series of their own (e.g. `outcome="error"` next to `op="get"`).
    text.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start(Backend::Sqlite).await;
    for path in ["healthz", "readyz"] {
        let response = server
            .http
            .get(format!("{}/{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }

    server.add_firmware("fw", "2.0.0", &firmware_bytes(1024, 1));
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.create_device("app", "d", "pw", None).await;
    for offset in [0u32, 512] {
        let status = Status::updating(b"1.0.0".to_vec(), Some(512), None, b"2.0.0".to_vec(), offset);
        let (code, _, _) = server
            .post_dfu("d@app", "pw", encode_status(&status, Encoding::Packed))
            .await;
        assert_eq!(code, 200);
    }
    let (code, _, _) = server.post_dfu("d@app", "pw", b"junk".to_vec()).await;
    assert_eq!(code, 400);

    let text = server.metrics().await;
    // The recorder is process-wide and tests run in parallel: at least what this test caused.
    assert!(
        sample(&text, "ajour_statuses_received_total", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_commands_sent_total", &["kind=\"write\""]) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_firmware_bytes_sent_total", &[]) >= 1024.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_errors_total", &["cause=\"decode\""]) >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_firmware_cache_total", &["result=\"miss\""]) >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_firmware_cache_total", &["result=\"hit\""]) >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "ajour_registry_calls_total", &["op=\"get\""]) >= 2.0,
        "{text}"
    );
    server.stop().await;
}
