//! HTTP routes. WebSocket and plain HTTP share one port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chinwag_core::Store;
use chinwag_proto::{ErrorCode, ServerFrame};

use crate::node::NodeState;

/// Bytes read from a WebSocket at a time.
const WS_READ_BUFFER: usize = 1024;
/// Bytes written frames may gather before they go to the socket.
const WS_WRITE_BUFFER: usize = 16 * 1024;

pub fn router<S: Store>(state: Arc<NodeState<S>>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/v1/cluster", get(cluster::<S>))
        .route("/v1/ws", get(websocket::<S>))
        .with_state(state)
}

async fn index() -> &'static str {
    "chinwag: WebSocket clients connect to /v1/ws (protocol v1)\n"
}

async fn healthz<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "dc": node.config.dc,
        "node": node.config.node,
        "incarnation": node.incarnation,
    });
    axum::Json(body).into_response()
}

async fn cluster<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    let status = match &node.cluster {
        Some(status) => status.borrow().clone(),
        // A single-DC node is a cluster of one.
        None => crate::cluster::ClusterStatus {
            dc: node.config.dc.clone(),
            ..Default::default()
        },
    };
    axum::Json(status).into_response()
}

async fn metrics<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        node.metrics.render(),
    )
        .into_response()
}

async fn websocket<S: Store>(State(node): State<Arc<NodeState<S>>>, upgrade: WebSocketUpgrade) -> Response {
    let Ok(slot) = node.connection_slots.clone().try_acquire_owned() else {
        node.metrics.error(ErrorCode::ServerBusy);
        let body = ServerFrame::Error {
            code: ErrorCode::ServerBusy,
            message: format!(
                "this node is at its limit of {} connections",
                node.config.limits.max_connections
            ),
            client_id: None,
            retry_after_ms: None,
        };
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    };
    let max = node.limits.max_frame_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // The library's defaults (128 KiB each) would make every idle connection cost
        // hundreds of KiB. Reads are small frames; writes are flushed by the driver.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_WRITE_BUFFER + 2 * max)
        .on_upgrade(move |socket| async move {
            crate::connection::serve(node, socket).await;
            drop(slot);
        })
}
