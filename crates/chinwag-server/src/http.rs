//! HTTP routes. WebSocket and plain HTTP share one port.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chinwag_core::Store;
use chinwag_proto::{ErrorCode, ServerFrame};

use crate::cluster::ClusterStatus;
use crate::edge::ConnInfo;
use crate::node::NodeState;

/// Bytes read from a WebSocket at a time.
const WS_READ_BUFFER: usize = 1024;
/// Bytes written frames may gather before they go to the socket.
const WS_WRITE_BUFFER: usize = 16 * 1024;

pub fn router<S: Store>(state: Arc<NodeState<S>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/v1/cluster", get(cluster::<S>))
        .route("/v1/cluster/events", get(cluster_events::<S>))
        .route("/v1/ws", get(websocket::<S>))
        .merge(crate::web::routes::<S>())
        .with_state(state)
}

async fn healthz<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    let failure = node.store.failure();
    let body = serde_json::json!({
        "status": if failure.is_some() { "failing" } else { "ok" },
        "dc": node.config.dc,
        "node": node.config.node,
        "incarnation": node.incarnation,
        "store": failure.as_deref().unwrap_or("ok"),
    });
    // A node whose store cannot write should be taken out of rotation by load balancers.
    let status = if failure.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

async fn cluster<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    axum::Json(cluster_status(&node)).into_response()
}

/// What `/v1/cluster` says, and what `/v1/cluster/events` streams.
fn cluster_status<S: Store>(node: &NodeState<S>) -> ClusterStatus {
    let status = match &node.cluster {
        Some(status) => status.borrow().clone(),
        // A single-DC node is a cluster of one.
        None => ClusterStatus {
            dc: node.config.dc.clone(),
            ..Default::default()
        },
    };
    status.with_dcs(&(node.snapshot)())
}

/// How often the cluster map is refreshed.
const CLUSTER_EVENTS_EVERY: Duration = Duration::from_secs(1);

/// The cluster view as server-sent events, one a second, for the live map.
async fn cluster_events<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    let shutdown = node.shutdown.clone();
    let events = futures_util::stream::unfold((node, shutdown, true), |(node, mut shutdown, first)| async move {
        if !first {
            tokio::select! {
                () = tokio::time::sleep(CLUSTER_EVENTS_EVERY) => {}
                _ = shutdown.changed() => return None,
            }
        }
        let event = Event::default().json_data(cluster_status(&node)).ok()?;
        Some((Ok::<_, std::convert::Infallible>(event), (node, shutdown, false)))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

async fn metrics<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        node.metrics.render(),
    )
        .into_response()
}

async fn websocket<S: Store>(
    State(node): State<Arc<NodeState<S>>>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = check_origin(&node.config.limits.allowed_origins, &headers) {
        node.metrics.error(ErrorCode::OriginNotAllowed);
        return refused;
    }
    let max = node.limits.max_frame_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // The library's defaults (128 KiB each) would make every idle connection cost
        // hundreds of KiB. Reads are small frames; writes are flushed by the driver.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_WRITE_BUFFER + 2 * max)
        .on_upgrade(move |socket| {
            // Boxed before the connection's future captures it: a socket held by value
            // is stored again at every layer it is moved through, in every idle task.
            let socket = Box::new(socket);
            async move {
                crate::connection::serve(node, socket, conn.peer).await;
                // The connection's place at the edge is given back only now.
                drop(conn);
            }
        })
}

/// Browsers send `Origin` with every WebSocket handshake, and a page on any site can open
/// one: with an allow-list configured, handshakes from other origins are refused (403).
/// Clients that are not browsers send no `Origin` and are not affected.
fn check_origin(allowed: &[String], headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    if allowed.is_empty() || allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
        return None;
    }
    let body = ServerFrame::Error {
        code: ErrorCode::OriginNotAllowed,
        message: format!(
            "origin {:?} is not allowed on this node",
            String::from_utf8_lossy(origin.as_bytes())
        ),
        client_id: None,
        retry_after_ms: None,
    };
    Some((StatusCode::FORBIDDEN, axum::Json(body)).into_response())
}
