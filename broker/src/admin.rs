//! A minimal admin REST API on Pulsar's admin v2 paths, so that `pulsar-admin` and REST users
//! can manage tenants, namespaces and topics of the embedded broker unchanged.
//!
//! Served: clusters (list), tenants (list, create, delete), namespaces (list, create,
//! delete), persistent topics (list, list partitioned, create, delete, stats) and partitioned
//! topics (`PUT .../partitions` with the partition count as JSON body, a number or a string
//! holding one, `GET` its metadata, `DELETE`), topic unload (`PUT .../unload`: producers and
//! consumers are closed and reconnect, the topic is opened again on next use; a partitioned
//! topic's name unloads all its partitions). Success of a
//! change is `204 No Content`, as Pulsar answers; errors are `{"reason": ...}` with
//! 401/403/404/409/412/400/500.
//!
//! Also `GET /metrics`: the broker's latency histograms (see `stats`) in the Prometheus text
//! format, as Pulsar serves its metrics on the same port.
//!
//! Authentication: when the broker has token authentication, every request needs
//! `Authorization: Bearer <token>`, and the role must be authorized (`Action::Manage`) for
//! the tenant/namespace it touches; lists show only what the role may manage. `/metrics` is
//! open, as Pulsar's is by default (`authenticateMetricsEndpoint=false`): scrapers carry no
//! token, and it names no tenant, topic or client.
//!
//! Non-persistent topics: the open ones listed (`GET /admin/v2/non-persistent/{t}/{ns}`) and
//! their stats (`.../{topic}/stats`, with drop counters); nothing else (there is nothing to
//! create or delete: they exist while clients use them).
//!
//! Not done: policies, permissions, retention settings, subscriptions management.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::{Action, BrokerAuth};
use crate::naming::TopicName;
use crate::registry::{Registry, RegistryError};

/// What every request handler shares.
struct Admin {
    registry: Arc<Registry>,
    auth: Option<BrokerAuth>,
}

type Shared = State<Arc<Admin>>;

/// An error answer.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "reason": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let code = match e {
            RegistryError::Exists(_) => StatusCode::CONFLICT,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Busy(_) => StatusCode::PRECONDITION_FAILED,
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::TooManyTopics | RegistryError::Storage(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Binds `addr` and serves the admin API until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    auth: Option<BrokerAuth>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = crate::server::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(Arc::new(Admin { registry, auth }));
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "admin API stopped");
        }
    });
    Ok((local, task))
}

/// The admin API's routes over `registry`, checked with `auth`.
pub(crate) fn router_for(registry: Arc<Registry>, auth: Option<BrokerAuth>) -> Router {
    router(Arc::new(Admin { registry, auth }))
}

fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin/v2/clusters", get(clusters))
        .route("/admin/v2/tenants", get(tenants))
        .route(
            "/admin/v2/tenants/{tenant}",
            get(tenant_info).put(create_tenant).delete(delete_tenant),
        )
        .route("/admin/v2/namespaces/{tenant}", get(namespaces))
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}",
            axum::routing::put(create_namespace).delete(delete_namespace),
        )
        .route("/admin/v2/persistent/{tenant}/{ns}", get(topics))
        .route(
            "/admin/v2/persistent/{tenant}/{ns}/partitioned",
            get(partitioned_topics),
        )
        .route(
            "/admin/v2/persistent/{tenant}/{ns}/{topic}",
            axum::routing::put(create_topic).delete(delete_topic),
        )
        .route(
            "/admin/v2/persistent/{tenant}/{ns}/{topic}/partitions",
            get(partitions)
                .put(create_partitioned)
                .post(update_partitioned)
                .delete(delete_partitioned),
        )
        .route(
            "/admin/v2/persistent/{tenant}/{ns}/{topic}/stats",
            get(stats),
        )
        .route(
            "/admin/v2/persistent/{tenant}/{ns}/{topic}/unload",
            axum::routing::put(unload),
        )
        .route(
            "/admin/v2/non-persistent/{tenant}/{ns}",
            get(non_persistent_topics),
        )
        .route(
            "/admin/v2/non-persistent/{tenant}/{ns}/{topic}/stats",
            get(non_persistent_stats),
        )
        .route("/metrics", get(metrics))
        .with_state(admin)
}

impl Admin {
    /// The caller's role (`None` without authentication), or 401.
    fn role(&self, headers: &HeaderMap) -> ApiResult<Option<String>> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        auth.authenticate(token.map(|_| "token"), token.map(str::as_bytes))
            .map(Some)
            .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.to_string()))
    }

    fn may(&self, role: &Option<String>, tenant: &str, ns: &str) -> bool {
        match (&self.auth, role) {
            (Some(auth), Some(role)) => auth.authorizer.authorize(role, tenant, ns, Action::Manage),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// Checks the caller may manage `tenant/ns`, or 401/403.
    /// The persistent topic a request names, once the caller may manage its namespace.
    fn topic(
        &self,
        headers: &HeaderMap,
        tenant: &str,
        ns: &str,
        topic: &str,
    ) -> ApiResult<TopicName> {
        self.check(headers, tenant, ns)?;
        topic_name(tenant, ns, topic)
    }

    fn check(&self, headers: &HeaderMap, tenant: &str, ns: &str) -> ApiResult<()> {
        let role = self.role(headers)?;
        if self.may(&role, tenant, ns) {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("not authorized for {tenant}/{ns}"),
            ))
        }
    }
}

fn topic_name(tenant: &str, ns: &str, topic: &str) -> ApiResult<TopicName> {
    TopicName::parse(&format!("persistent://{tenant}/{ns}/{topic}"))
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

fn check_segment(what: &str, s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > 64 || s.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid {what} name"),
        ));
    }
    Ok(())
}

/// Prometheus text exposition format 0.0.4.
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::stats::prometheus_text(),
    )
}

async fn clusters() -> Json<Vec<&'static str>> {
    Json(vec!["standalone"])
}

async fn tenants(State(a): Shared, headers: HeaderMap) -> ApiResult<Json<Vec<String>>> {
    let role = a.role(&headers)?;
    let all = a.registry.tenants();
    Ok(Json(
        all.into_iter().filter(|t| a.may(&role, t, "")).collect(),
    ))
}

async fn tenant_info(
    State(a): Shared,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    a.check(&headers, &tenant, "")?;
    if !a.registry.tenants().contains(&tenant) {
        return Err(RegistryError::NotFound(format!("tenant {tenant}")).into());
    }
    Ok(Json(
        json!({ "adminRoles": [], "allowedClusters": ["standalone"] }),
    ))
}

async fn create_tenant(
    State(a): Shared,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> ApiResult<StatusCode> {
    check_segment("tenant", &tenant)?;
    a.check(&headers, &tenant, "")?;
    a.registry.create_tenant(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_tenant(
    State(a): Shared,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> ApiResult<StatusCode> {
    a.check(&headers, &tenant, "")?;
    a.registry.delete_tenant(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn namespaces(
    State(a): Shared,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    let role = a.role(&headers)?;
    if !a.registry.tenants().contains(&tenant) {
        return Err(RegistryError::NotFound(format!("tenant {tenant}")).into());
    }
    let all = a.registry.namespaces(&tenant);
    Ok(Json(
        all.into_iter()
            .filter(|n| a.may(&role, &tenant, n.split_once('/').map_or("", |(_, ns)| ns)))
            .collect(),
    ))
}

async fn create_namespace(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    check_segment("namespace", &ns)?;
    a.check(&headers, &tenant, &ns)?;
    if !a.registry.tenants().contains(&tenant) {
        return Err(RegistryError::NotFound(format!("tenant {tenant}")).into());
    }
    a.registry
        .create_namespace(&format!("{tenant}/{ns}"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_namespace(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    a.check(&headers, &tenant, &ns)?;
    a.registry
        .delete_namespace(&format!("{tenant}/{ns}"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn topics(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    a.check(&headers, &tenant, &ns)?;
    Ok(Json(
        a.registry.topics_of_namespace(&format!("{tenant}/{ns}")),
    ))
}

async fn partitioned_topics(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    a.check(&headers, &tenant, &ns)?;
    let list = a.registry.partitioned_in(&format!("{tenant}/{ns}"));
    Ok(Json(list.into_iter().map(|(t, _)| t).collect()))
}

async fn create_topic(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    a.registry.create(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_topic(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    a.registry.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn partitions(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    Ok(Json(json!({ "partitions": a.registry.partitions(&name) })))
}

async fn create_partitioned(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
    body: String,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    let n = partition_count(&body).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "the body must be the number of partitions".into(),
        )
    })?;
    a.registry.create_partitioned(&name, n).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../partitions`: raises the partition count (Apache's `updatePartitionedTopic`).
async fn update_partitioned(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
    body: String,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    let n = partition_count(&body).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "the body must be the number of partitions".into(),
        )
    })?;
    a.registry.update_partitioned(&name, n).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The partition count of a `PUT .../partitions` body: a JSON number (`3`, what `pulsar-admin`
/// sends) or a JSON string holding one (`"3"`, what the `pulsar` crate's tests send; Pulsar's
/// JSON reader takes both).
fn partition_count(body: &str) -> Option<u32> {
    let body = body.trim();
    let digits = body
        .strip_prefix('"')
        .and_then(|b| b.strip_suffix('"'))
        .unwrap_or(body);
    digits.trim().parse().ok()
}

async fn delete_partitioned(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    a.registry.delete_partitioned(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unload(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    a.registry.unload(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A subscription's consumers as Pulsar's stats list them (`consumerName`).
fn consumers_json(names: &[String]) -> Vec<serde_json::Value> {
    names.iter().map(|n| json!({ "consumerName": n })).collect()
}

async fn stats(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    let s = a.registry.stats(&name).await?;
    // Pulsar's field names where they exist, so its tools read them.
    let subscriptions: serde_json::Map<String, serde_json::Value> = s
        .subscriptions
        .iter()
        .map(|sub| {
            (
                sub.name.clone(),
                json!({
                    "msgBacklog": sub.backlog,
                    "type": sub.sub_type,
                    "isDurable": sub.durable,
                    "consumers": consumers_json(&sub.consumers),
                }),
            )
        })
        .collect();
    Ok(Json(json!({
        "msgInCounter": s.messages,
        "entries": s.entries,
        "storageSize": s.storage_bytes,
        "publishers": s.producers.iter().map(|p| json!({ "producerName": p })).collect::<Vec<_>>(),
        "subscriptions": subscriptions,
    })))
}

/// The open non-persistent topics of a namespace (Pulsar lists the active ones too).
async fn non_persistent_topics(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    a.check(&headers, &tenant, &ns)?;
    let namespace = format!("{tenant}/{ns}");
    Ok(Json(
        a.registry.non_persistent.topics_of_namespace(&namespace),
    ))
}

/// A non-persistent topic's stats: Pulsar's field names where it has counters; Pulsar
/// reports drops as rates (`msgDropRate`), Magnetar as counts since the topic opened
/// (`msgDropCounter`, per subscription too). 404 when the topic is not open.
async fn non_persistent_stats(
    State(a): Shared,
    headers: HeaderMap,
    Path((tenant, ns, topic)): Path<(String, String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = a.topic(&headers, &tenant, &ns, &topic)?;
    let (s, counters) = a.registry.non_persistent.stats(&name).await?;
    let dropped = counters
        .dropped_by_subscription
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let subscriptions: serde_json::Map<String, serde_json::Value> = s
        .subscriptions
        .iter()
        .map(|sub| {
            (
                sub.name.clone(),
                json!({
                    "msgBacklog": 0,
                    "type": sub.sub_type,
                    "isDurable": sub.durable,
                    "consumers": consumers_json(&sub.consumers),
                    "msgDropCounter": dropped.get(&sub.name).copied().unwrap_or(0),
                }),
            )
        })
        .collect();
    Ok(Json(json!({
        "msgInCounter": load(&counters.msg_in),
        "bytesInCounter": load(&counters.bytes_in),
        "msgOutCounter": load(&counters.msg_out),
        "msgDropCounter": load(&counters.msg_dropped),
        "storageSize": 0,
        "publishers": s.producers.iter().map(|p| json!({ "producerName": p })).collect::<Vec<_>>(),
        "subscriptions": subscriptions,
    })))
}

#[cfg(test)]
mod tests {
    use super::partition_count;

    #[test]
    fn a_partition_count_is_a_json_number_or_a_string_holding_one() {
        assert_eq!(partition_count("3"), Some(3));
        assert_eq!(partition_count(" 12\n"), Some(12));
        assert_eq!(partition_count("\"3\""), Some(3));
        assert_eq!(partition_count("\"\""), None);
        assert_eq!(partition_count("\"3"), None);
        assert_eq!(partition_count("-1"), None);
        assert_eq!(partition_count("three"), None);
        assert_eq!(partition_count("{\"partitions\": 3}"), None);
    }
}
