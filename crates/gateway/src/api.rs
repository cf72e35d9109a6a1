//! The HTTP face of the gateway: OpenAI's routes on axum. Each handler
//! is parse → plan ([`crate::plan`]) → drive ([`Gateway::start`]) → render
//! ([`crate::render`]); errors become OpenAI's shape in one place
//! ([`ApiError`]'s `IntoResponse`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::keys::{Caller, KeyStatus};
use crate::metrics::RequestLabels;
use crate::openai::*;
use crate::service::Gateway;
use crate::{plan, render};

/// The gateway's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/v1/hotpot/key", get(key_status))
        .route("/v1/hotpot/keys", post(mint_key))
        .route("/v1/hotpot/keys/{name}", axum::routing::delete(revoke_key))
        .route("/v1/hotpot/spend", get(spend_log))
        .route("/v1/files", post(upload_file).get(list_files).layer(DefaultBodyLimit::max(crate::files::MAX_FILE_BYTES + (64 << 10))))
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/", get(dashboard))
        .route("/v1/hotpot/swarm", get(swarm))
        .route("/v1/hotpot/evidence/{name}", get(evidence))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound { message: "no such route".into(), code: "not_found" } })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError::MethodNotAllowed(format!("{} is not allowed on {}", request.method(), request.uri().path()))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&gateway), count_requests))
        .with_state(gateway)
}

async fn count_requests(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    gateway.metrics.requests.get_or_create(&RequestLabels { endpoint, status: response.status().as_u16() }).inc();
    response
}

/// A JSON body whose every failure is an OpenAI-shaped error, and its
/// size in bytes. The whole body must arrive within the read timeout.
pub struct Body<T>(pub T, pub usize);

impl<T: DeserializeOwned> FromRequest<Arc<Gateway>> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, gateway: &Arc<Gateway>) -> Result<Self, ApiError> {
        let timeout = gateway.config.http.read_timeout;
        let _receiving = request.extensions().get::<crate::http::Connection>().map(crate::http::Connection::receiving);
        let bytes = tokio::time::timeout(timeout, Bytes::from_request(request, gateway))
            .await
            .map_err(|_| ApiError::Timeout(format!("the request body did not arrive within {} s", timeout.as_secs_f64())))?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge("the request body is too large".into())
                } else {
                    ApiError::bad(rejection.body_text())
                }
            })?;
        let size = bytes.len();
        let parsed = serde_json::from_slice(&bytes).map(|value| Body(value, size)).map_err(|e| ApiError::bad(format!("invalid request body: {e}")));
        drop(bytes);
        if size > crate::prep::IN_PLACE_BYTES << 4 {
            crate::prep::release_memory();
        }
        parsed
    }
}

impl Gateway {
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let Some(keys) = &self.config.keys else {
            return Ok(None);
        };
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        keys.admit(value).map(Some)
    }

    pub(crate) fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if self.serves(name) {
            Ok(())
        } else {
            Err(ApiError::NotFound {
                message: format!("the model `{name}` does not exist (this gateway serves `{}`)", self.model.name),
                code: "model_not_found",
            })
        }
    }
}

async fn chat(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, Body(request, size): Body<ChatRequest>) -> Result<Response, ApiError> {
    let caller = gateway.authorize(&headers)?;
    let prepared = Arc::clone(&gateway);
    let (plan, shape) = gateway.prep.run(size, move || plan::chat(&prepared, caller, request)).await??;
    let events = gateway.start(plan).await?;
    render::chat(gateway, shape, events).await
}

async fn completions(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, Body(request, size): Body<CompletionRequest>) -> Result<Response, ApiError> {
    let caller = gateway.authorize(&headers)?;
    let prepared = Arc::clone(&gateway);
    let (plan, shape) = gateway.prep.run(size, move || plan::completions(&prepared, caller, request)).await??;
    let events = gateway.start(plan).await?;
    render::completions(gateway, shape, events).await
}

async fn responses(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Body(request, size): Body<crate::responses::ResponsesRequest>,
) -> Result<Response, ApiError> {
    let caller = gateway.authorize(&headers)?;
    crate::responses::respond(gateway, caller, request, size).await
}

/// `GET /v1/hotpot/key`: the calling key's budget, spending and holds.
async fn key_status(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<KeyStatus>, ApiError> {
    let (keys, caller) = key_caller(&gateway, &headers)?;
    let mut status = keys.status(&caller).ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
    if let Some(market) = &gateway.config.market
        && let Some(payer) = keys.payer(&caller)
    {
        let (credits, held) = market.credits_of(&payer)?;
        status.credits = Some(credits.to_string());
        status.credits_held = Some(held.to_string());
        status.pays_from = Some(payer);
    }
    Ok(Json(status))
}

/// The key store and the calling key, for the key routes.
fn key_caller<'a>(gateway: &'a Gateway, headers: &HeaderMap) -> Result<(&'a Arc<crate::keys::KeyStore>, Caller), ApiError> {
    let keys = gateway.config.keys.as_ref().ok_or_else(|| ApiError::NotFound { message: "this gateway has no API keys".into(), code: "not_found" })?;
    let caller = keys.admit(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    Ok((keys, caller))
}

/// `POST /v1/hotpot/keys`: the calling key mints a child key whose limits
/// fit inside its own (the body: `name`, `credits`, `daily_limit`,
/// `models`, `max_price`, `expires_at`, `token_budget`,
/// `requests_per_minute`, all optional).
async fn mint_key(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, Body(spec, _): Body<crate::keys::KeySpec>) -> Result<Response, ApiError> {
    let (keys, caller) = key_caller(&gateway, &headers)?;
    if !spec.key.is_empty() || spec.prepaid {
        return Err(ApiError::bad("a child key gets its key from the gateway and pays from its root's account: leave out `key` and `prepaid`"));
    }
    let (key, status) = keys.mint(&caller, spec)?;
    tracing::info!(parent = %caller.name, child = %status.name, "minted a child key");
    let body = serde_json::json!({"key": key, "status": status});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /v1/hotpot/keys/{name}`: revokes that key (the caller's own or
/// a descendant's), and with it every key below it.
async fn revoke_key(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (keys, caller) = key_caller(&gateway, &headers)?;
    keys.revoke(&caller, &name)?;
    tracing::info!(by = %caller.name, key = %name, "revoked a key and its descendants");
    Ok(Json(serde_json::json!({"revoked": name})))
}

/// `GET /v1/hotpot/spend`: the calling key's spend log, hash-chained and
/// signed by this gateway (check it with `hotpot spend verify`).
async fn spend_log(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<crate::spend::SpendLog>, ApiError> {
    let (keys, caller) = key_caller(&gateway, &headers)?;
    let mut log = keys.spend_log(&caller)?;
    log.gateway = gateway.peer_id();
    Ok(Json(log))
}

/// The file store and who owns the caller's files (the key's hash; one
/// shared owner on a gateway without keys).
fn file_owner<'a>(gateway: &'a Gateway, headers: &HeaderMap) -> Result<(&'a Arc<crate::files::FileStore>, String), ApiError> {
    let caller = gateway.authorize(headers)?;
    let files = gateway.config.files.as_ref().ok_or_else(|| ApiError::NotFound { message: "this gateway keeps no files".into(), code: "not_found" })?;
    Ok((files, caller.map_or_else(|| crate::batch::OPEN_OWNER.to_string(), |c| c.key)))
}

/// Runs a file store operation off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

/// `POST /v1/files` (multipart: `file`, `purpose`).
async fn upload_file(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    mut form: axum::extract::Multipart,
) -> Result<Json<crate::files::FileObject>, ApiError> {
    let (files, owner) = file_owner(&gateway, &headers)?;
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("a file may hold at most {} MiB", crate::files::MAX_FILE_BYTES >> 20))
        } else {
            ApiError::bad(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    let read = async {
        let (mut purpose, mut file) = (None, None);
        while let Some(field) = form.next_field().await.map_err(failed)? {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await.map_err(failed)?),
                Some("file") => {
                    let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                    file = Some((name, field.bytes().await.map_err(failed)?));
                }
                _ => {}
            }
        }
        Ok::<_, ApiError>((purpose, file))
    };
    let (purpose, file) = tokio::time::timeout(std::time::Duration::from_secs(300), read)
        .await
        .map_err(|_| ApiError::Timeout("the file did not arrive within 300 s".into()))??;
    let purpose = purpose.ok_or_else(|| ApiError::bad_param("purpose", "purpose is required"))?;
    let (name, bytes) = file.ok_or_else(|| ApiError::bad_param("file", "file is required"))?;
    if bytes.len() > crate::files::MAX_FILE_BYTES {
        return Err(ApiError::PayloadTooLarge(format!("a file may hold at most {} MiB", crate::files::MAX_FILE_BYTES >> 20)));
    }
    let files = Arc::clone(files);
    Ok(Json(blocking(move || files.create(&owner, &name, &purpose, &bytes)).await?))
}

/// `GET /v1/files`.
async fn list_files(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    let (files, owner) = file_owner(&gateway, &headers)?;
    let files = Arc::clone(files);
    let data = blocking(move || files.list(&owner)).await?;
    Ok(Json(serde_json::json!({"object": "list", "data": data, "has_more": false})))
}

/// `GET /v1/files/{id}`.
async fn get_file(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::files::FileObject>, ApiError> {
    let (files, owner) = file_owner(&gateway, &headers)?;
    let files = Arc::clone(files);
    Ok(Json(blocking(move || files.get(&owner, &id)).await?))
}

/// `GET /v1/files/{id}/content`.
async fn file_content(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let (files, owner) = file_owner(&gateway, &headers)?;
    let files = Arc::clone(files);
    let bytes = blocking(move || files.content(&owner, &id)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `DELETE /v1/files/{id}`.
async fn delete_file(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (files, owner) = file_owner(&gateway, &headers)?;
    let (store, gone) = (Arc::clone(files), id.clone());
    blocking(move || store.delete(&owner, &gone)).await?;
    Ok(Json(serde_json::json!({"id": id, "object": "file", "deleted": true})))
}

/// The batch store and who owns the caller's batches (as for files).
fn batch_owner(gateway: &Gateway, headers: &HeaderMap) -> Result<(Arc<crate::files::FileStore>, Arc<crate::batch::BatchStore>, String), ApiError> {
    let (files, owner) = file_owner(gateway, headers)?;
    let batches = gateway.config.batches.as_ref().ok_or_else(|| ApiError::NotFound { message: "this gateway runs no batches".into(), code: "not_found" })?;
    Ok((Arc::clone(files), Arc::clone(batches), owner))
}

/// `POST /v1/batches`: a batch over an uploaded file of `purpose: batch`.
async fn create_batch(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Body(spec, _): Body<crate::batch::CreateBatch>,
) -> Result<Json<crate::batch::BatchObject>, ApiError> {
    let (files, batches, owner) = batch_owner(&gateway, &headers)?;
    Ok(Json(
        blocking(move || {
            let file = files.get(&owner, &spec.input_file_id)?;
            if file.purpose != "batch" {
                return Err(ApiError::bad_param("input_file_id", format!("file {} has purpose `{}`, not `batch`", file.id, file.purpose)));
            }
            batches.create(&owner, &spec)
        })
        .await?,
    ))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/batches?after=ID&limit=N` (newest first, 20 by default, 100 at most).
async fn list_batches(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, batches, owner) = batch_owner(&gateway, &headers)?;
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let (data, has_more) = blocking(move || batches.list(&owner, query.after.as_deref(), limit)).await?;
    let (first_id, last_id) = (data.first().map(|b| b.id.clone()), data.last().map(|b| b.id.clone()));
    Ok(Json(serde_json::json!({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more})))
}

/// `GET /v1/batches/{id}`.
async fn get_batch(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::batch::BatchObject>, ApiError> {
    let (_, batches, owner) = batch_owner(&gateway, &headers)?;
    Ok(Json(blocking(move || batches.get(&owner, &id)).await?))
}

/// `POST /v1/batches/{id}/cancel`.
async fn cancel_batch(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::batch::BatchObject>, ApiError> {
    let (_, batches, owner) = batch_owner(&gateway, &headers)?;
    Ok(Json(blocking(move || batches.cancel(&owner, &id)).await?))
}

async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<ModelList>, ApiError> {
    gateway.authorize(&headers)?;
    let data = match gateway.cheapest_route_price() {
        Some(nodes) => {
            let fee = gateway.config.market.as_ref().map_or(hotpot_core::Credits::ZERO, |m| m.fee_per_1k);
            let hotpot =
                ModelPrice { price_per_1k: nodes.checked_add(fee).unwrap_or(nodes).to_string(), nodes_per_1k: nodes.to_string(), fee_per_1k: fee.to_string() };
            vec![ModelCard { id: gateway.model.name.clone(), object: "model", created: 0, owned_by: "hotpot", hotpot }]
        }
        None => Vec::new(),
    };
    Ok(Json(ModelList { object: "list", data }))
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let missing = gateway.missing_blocks();
    Json(serde_json::json!({
        "status": if missing.is_empty() { "ok" } else { "degraded" },
        "model": gateway.model.name,
        "model_id": gateway.model.id.to_full_string(),
        "missing_blocks": missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
}

/// The swarm dashboard: one page, embedded, drawing `/v1/hotpot/swarm`.
async fn dashboard() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], crate::swarm::DASHBOARD_HTML)
}

async fn swarm(State(gateway): State<Arc<Gateway>>) -> Json<crate::swarm::SwarmView> {
    Json(gateway.swarm_view().await)
}

/// An evidence file this gateway wrote (`<node>-<ms>.json`), as linked
/// from its convictions.
async fn evidence(State(gateway): State<Arc<Gateway>>, axum::extract::Path(name): axum::extract::Path<String>) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound { message: format!("no evidence file {name:?}"), code: "evidence_not_found" };
    let plain = name.ends_with(".json") && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let Some(dir) = gateway.evidence_dir().filter(|_| plain) else { return Err(not_found()) };
    let path = dir.join(&name);
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path)).await.ok().and_then(Result::ok).ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], gateway.metrics.render())
}
