//! The bare endpoint: the least a server must do per block (decode the status, slice the image,
//! encode the command), with no authentication, registry or status tracking, and no code of
//! Ajour's ([`crate::bare_wire`]). The load generator measures it in the same run as
//! `ajour serve`, as the baseline.

use crate::bare_wire::{answer, Image};
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Args;
use std::sync::Arc;

/// What every bare baseline (HTTP, CoAP, MQTT endpoint) is started with.
#[derive(Debug, Args)]
pub struct BareServerArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long, default_value_t = 65536)]
    pub image_size: usize,
    #[arg(long, default_value = "2.0.0")]
    pub version: String,
}

pub async fn serve(args: BareServerArgs) -> anyhow::Result<()> {
    let image = Arc::new(Image::new(
        args.version,
        crate::fleet::bench_image(args.image_size),
    ));
    let app = axum::Router::new().route(
        "/v1/{channel}",
        axum::routing::post(move |body: Bytes| {
            let image = image.clone();
            async move {
                match answer(&image, &body) {
                    Some(command) => (StatusCode::OK, [("command", "dfu")], command).into_response(),
                    None => (StatusCode::BAD_REQUEST, "not a status").into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("bare endpoint listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
