//! The web app and cluster map (static files compiled into the binary), and the
//! development sign-in that mints tokens when `dev.sign_in` is on.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chinwag_core::{Store, UserId};
use serde::{Deserialize, Serialize};

use crate::connection::now_ms;
use crate::node::NodeState;

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");
const CLUSTER: &str = include_str!("../web/cluster.html");
const CLUSTER_JS: &str = include_str!("../web/cluster.js");

/// How the page learns whether to offer "sign in as": the node rewrites this attribute.
const DEV_OFF: &str = r#"data-dev-sign-in="off""#;
const DEV_ON: &str = r#"data-dev-sign-in="on""#;

/// Lifetime of a development token: a working day.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The pages load nothing from elsewhere and run no inline script.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes<S: Store>() -> Router<Arc<NodeState<S>>> {
    Router::new()
        .route("/", get(index::<S>))
        .route("/app.js", get(|| async { asset("text/javascript", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css", STYLE) }))
        .route("/cluster", get(|| async { asset("text/html", CLUSTER) }))
        .route("/cluster.js", get(|| async { asset("text/javascript", CLUSTER_JS) }))
        .route("/v1/dev/token", post(dev_token::<S>).layer(DefaultBodyLimit::max(1024)))
}

async fn index<S: Store>(State(node): State<Arc<NodeState<S>>>) -> Response {
    if node.dev_tokens.is_some() {
        asset("text/html", INDEX.replacen(DEV_OFF, DEV_ON, 1))
    } else {
        asset("text/html", INDEX)
    }
}

fn asset(kind: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            // Small files, and a new binary must show its new app at once.
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (header::CONTENT_SECURITY_POLICY, CSP.to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        body.into(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    user: String,
}

#[derive(Serialize)]
struct DevTokenResponse {
    user: String,
    token: String,
    expires_in_s: u64,
}

async fn dev_token<S: Store>(
    State(node): State<Arc<NodeState<S>>>,
    request: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(dev) = &node.dev_tokens else {
        return http_error(
            StatusCode::NOT_FOUND,
            "dev_sign_in_disabled",
            "development sign-in is off on this node (dev.sign_in)".to_owned(),
        );
    };
    let Json(request) = match request {
        Ok(request) => request,
        Err(e) => return http_error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let user = match UserId::parse(&request.user) {
        Ok(user) => user,
        Err(e) => {
            let message = format!("user {:?}: {e}", request.user);
            return http_error(StatusCode::BAD_REQUEST, "bad_user", message);
        }
    };
    tracing::warn!(%user, "development sign-in: token minted");
    let token = chinwag_auth::mint(&dev.key, &user, DEV_TOKEN_TTL, now_ms(), &dev.policy);
    Json(DevTokenResponse {
        user: user.to_string(),
        token,
        expires_in_s: DEV_TOKEN_TTL.as_secs(),
    })
    .into_response()
}

fn http_error(status: StatusCode, code: &'static str, message: String) -> Response {
    (status, Json(serde_json::json!({ "code": code, "message": message }))).into_response()
}
