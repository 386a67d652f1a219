//! Health, readiness and Prometheus metrics, of the `ajour` binary: its `/metrics` are its own (the
//! recorder is per process, and this process runs many servers at once), so every count below is
//! exactly what this test caused.

use crate::support::*;
use ajour_protocol::{encode_status, Encoding, Status};
use serde_json::json;

#[tokio::test]
async fn health_readiness_and_metrics_count_exactly_what_a_device_did() {
    for backend in BACKENDS {
        let serve = ServeProcess::start(backend, &[], &[]).await;
        for path in ["healthz", "readyz"] {
            assert_eq!(serve.get(path).await.status(), 200, "{backend:?} {path}");
        }
        serve.add_firmware("fw", "2.0.0", &firmware_bytes(1024, 1));
        serve
            .create_app("app", Some(json!({"file": {"name": "fw"}})))
            .await;
        serve.create_device("app", "d", "pw", None).await;
        // The whole image in two blocks, then a status that does not decode.
        for offset in [0u32, 512] {
            let status = Status::updating(b"1.0.0".to_vec(), Some(512), None, b"2.0.0".to_vec(), offset);
            let (code, _, _) = serve
                .post_dfu("d@app", "pw", encode_status(&status, Encoding::Packed))
                .await;
            assert_eq!(code, 200);
        }
        let (code, _, _) = serve.post_dfu("d@app", "pw", b"junk".to_vec()).await;
        assert_eq!(code, 400);

        let metrics = serve.metrics().await;
        let file_cache = |result| {
            metrics.value(
                "ajour_firmware_cache_total",
                &[("source", "file"), ("result", result)],
            )
        };
        let registry_calls =
            |op, outcome| metrics.value("ajour_registry_calls_total", &[("op", op), ("outcome", outcome)]);
        let counts = [
            (
                "statuses received",
                metrics.value("ajour_statuses_received_total", &[]),
                3.0,
            ),
            (
                "Writes sent",
                metrics.value("ajour_commands_sent_total", &[("kind", "write")]),
                2.0,
            ),
            (
                "firmware bytes sent",
                metrics.value("ajour_firmware_bytes_sent_total", &[]),
                1024.0,
            ),
            (
                "statuses that did not decode",
                metrics.value("ajour_errors_total", &[("cause", "decode")]),
                1.0,
            ),
            // Read from disk once, then served from memory.
            ("firmware read from disk", file_cache("miss"), 1.0),
            ("firmware served from memory", file_cache("hit"), 1.0),
            // The device and its application, once: the spec cache serves the other statuses.
            ("registry reads", registry_calls("get", "ok"), 2.0),
            ("registry creates", registry_calls("create", "ok"), 2.0),
        ];
        for (what, counted, expected) in counts {
            assert_eq!(counted, expected, "{backend:?}: {what}:\n{metrics}");
        }
    }
}
