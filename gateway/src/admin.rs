//! The admin HTTP API: tenants, users, keys and usage, changed live; metrics and health.
//!
//! Every `/admin/v1` call needs `Authorization: Bearer <token>`: the configured
//! `admin.token`, or a JWT of the superuser role. Changes apply at once to new
//! authentications, new connections and (limits) running meters, and are saved in
//! `data_dir/admin/changes.json`, replayed over the config file at the next start, so that a
//! restart keeps them.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /admin/v1/tenants | list tenants |
//! | GET / PUT / DELETE | /admin/v1/tenants/{name} | one tenant (PUT body: namespaces, encryption, limits) |
//! | GET | /admin/v1/users | list users (never their hashes) |
//! | GET / PUT / DELETE | /admin/v1/users/{name} | one user (PUT body: tenant, namespace, password or password_hash, permissions, limits) |
//! | POST | /admin/v1/users/{name}/token?expires_in=1h | a token for the user |
//! | GET | /admin/v1/usage, /admin/v1/tenants/{name}/usage | usage counters |
//! | POST | /admin/v1/tenants/{name}/keys/rotate | new active data key |
//! | DELETE | /admin/v1/tenants/{name}/keys | crypto-shred the tenant's data |
//! | GET | /metrics | Prometheus text (no token) |
//! | GET | /healthz | liveness (no token) |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::config::{LimitsConfig, PermissionConfig, TenantConfig, UserConfig};
use crate::host::Services;
use crate::names::validate_segment;
use crate::tenancy::Tenancy;

/// Changes made through the API, replayed over the config at start (`None`: deleted).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Changes {
    #[serde(default)]
    pub tenants: BTreeMap<String, Option<TenantConfig>>,
    #[serde(default)]
    pub users: BTreeMap<String, Option<UserConfig>>,
}

impl Changes {
    fn path(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("admin").join("changes.json")
    }

    /// Reads the saved changes (none if the file does not exist).
    pub fn load(data_dir: &std::path::Path) -> anyhow::Result<Changes> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Changes::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Applies the changes to a tenancy built from the config.
    pub fn apply(&self, tenancy: &Tenancy) -> anyhow::Result<()> {
        for (name, t) in &self.tenants {
            match t {
                Some(t) => tenancy.put_tenant(t.clone()),
                None => {
                    tenancy.delete_tenant(name);
                }
            }
        }
        for (name, u) in &self.users {
            match u {
                Some(u) => {
                    tenancy.put_user_config(u)?;
                }
                None => {
                    tenancy.delete_user(name);
                }
            }
        }
        Ok(())
    }

    fn save(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::secret::write_private(&Self::path(data_dir), &json)
    }
}

/// What the handlers share.
#[derive(Clone)]
struct Admin {
    services: Arc<Services>,
    token: Option<String>,
    data_dir: PathBuf,
    changes: Arc<Mutex<Changes>>,
}

/// An API error: a status and a message, as JSON.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bad(message: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.to_string())
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

impl Admin {
    fn check(&self, headers: &HeaderMap) -> ApiResult<()> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(presented) = presented else {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required".into(),
            ));
        };
        if let Some(t) = &self.token {
            if crate::secret::constant_time_eq(t.as_bytes(), presented.as_bytes()) {
                return Ok(());
            }
        }
        let tenancy = &self.services.tenancy;
        match magnetar_broker::auth::verify(&tenancy.token_keys().verify, presented) {
            Ok(c) if c.sub == tenancy.superuser_role() => Ok(()),
            _ => Err(ApiError(StatusCode::FORBIDDEN, "not an admin token".into())),
        }
    }

    fn record(&self, f: impl FnOnce(&mut Changes)) -> ApiResult<()> {
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut changes);
        changes.save(&self.data_dir).map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("saving the change: {e}"),
            )
        })
    }
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    services: Arc<Services>,
    token: Option<String>,
    data_dir: PathBuf,
    changes: Changes,
) {
    let state = Admin {
        services,
        token,
        data_dir,
        changes: Arc::new(Mutex::new(changes)),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/admin/v1/tenants", get(list_tenants))
        .route(
            "/admin/v1/tenants/{name}",
            get(get_tenant).put(put_tenant).delete(delete_tenant),
        )
        .route("/admin/v1/tenants/{name}/usage", get(tenant_usage))
        .route("/admin/v1/tenants/{name}/keys/rotate", post(rotate_key))
        .route(
            "/admin/v1/tenants/{name}/keys",
            get(list_keys).delete(shred_keys),
        )
        .route("/admin/v1/users", get(list_users))
        .route(
            "/admin/v1/users/{name}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/admin/v1/users/{name}/token", post(user_token))
        .route("/admin/v1/usage", get(all_usage))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin API stopped");
    }
}

async fn list_tenants(State(a): State<Admin>, h: HeaderMap) -> ApiResult<Json<Vec<TenantConfig>>> {
    a.check(&h)?;
    Ok(Json(a.services.tenancy.tenants()))
}

async fn get_tenant(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<TenantConfig>> {
    a.check(&h)?;
    a.services
        .tenancy
        .tenants()
        .into_iter()
        .find(|t| t.name == name)
        .map(Json)
        .ok_or_else(|| not_found("tenant"))
}

/// A tenant as PUT takes it (the name comes from the path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    encryption: bool,
    #[serde(default)]
    pulsar_encryption: Option<crate::config::PulsarEncryptionConfig>,
    #[serde(default)]
    limits: LimitsConfig,
}

async fn put_tenant(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<TenantBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<TenantConfig>> {
    a.check(&h)?;
    let Json(body) = body.map_err(|e| bad(e.body_text()))?;
    validate_segment(&name).map_err(bad)?;
    let namespaces = body.namespaces.unwrap_or_else(|| vec!["default".into()]);
    for ns in &namespaces {
        validate_segment(ns).map_err(bad)?;
    }
    let tenant = TenantConfig {
        name: name.clone(),
        namespaces,
        encryption: body.encryption,
        pulsar_encryption: body.pulsar_encryption,
        limits: body.limits,
    };
    a.services.tenancy.put_tenant(tenant.clone());
    a.services
        .quotas
        .update_tenant(&name, tenant.limits.clone());
    a.record(|c| {
        c.tenants.insert(name, Some(tenant.clone()));
    })?;
    Ok(Json(tenant))
}

async fn delete_tenant(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    a.check(&h)?;
    let users: Vec<String> = a
        .services
        .tenancy
        .users()
        .into_iter()
        .filter(|u| u.tenant == name)
        .map(|u| u.name)
        .collect();
    if !a.services.tenancy.delete_tenant(&name) {
        return Err(not_found("tenant"));
    }
    a.record(|c| {
        c.tenants.insert(name, None);
        for u in users {
            c.users.insert(u, None);
        }
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn tenant_usage(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::quota::Usage>> {
    a.check(&h)?;
    Ok(Json(
        a.services
            .quotas
            .tenant_usage()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, u)| u)
            .unwrap_or_default(),
    ))
}

async fn all_usage(
    State(a): State<Admin>,
    h: HeaderMap,
) -> ApiResult<Json<BTreeMap<String, crate::quota::Usage>>> {
    a.check(&h)?;
    Ok(Json(a.services.quotas.tenant_usage().into_iter().collect()))
}

async fn rotate_key(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    a.check(&h)?;
    if a.services.tenancy.tenant(&name).is_none() {
        return Err(not_found("tenant"));
    }
    let id = a
        .services
        .keys
        .rotate(&name)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(serde_json::json!({ "active": id })))
}

async fn list_keys(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    a.check(&h)?;
    let (active, ids) = a
        .services
        .keys
        .key_ids(&name)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(serde_json::json!({ "active": active, "keys": ids })))
}

async fn shred_keys(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    a.check(&h)?;
    a.services
        .keys
        .shred(&name)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::warn!(tenant = %name, "data keys shredded: the tenant's encrypted data is unreadable");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_users(
    State(a): State<Admin>,
    h: HeaderMap,
) -> ApiResult<Json<Vec<crate::tenancy::UserView>>> {
    a.check(&h)?;
    Ok(Json(a.services.tenancy.users()))
}

async fn get_user(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::tenancy::UserView>> {
    a.check(&h)?;
    a.services
        .tenancy
        .users()
        .into_iter()
        .find(|u| u.name == name)
        .map(Json)
        .ok_or_else(|| not_found("user"))
}

/// A user as PUT takes it (the name comes from the path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    tenant: String,
    #[serde(default = "default_ns")]
    namespace: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_hash: Option<String>,
    #[serde(default)]
    certificate_cn: Option<String>,
    #[serde(default)]
    permissions: Vec<PermissionConfig>,
    #[serde(default)]
    limits: LimitsConfig,
}

fn default_ns() -> String {
    "default".into()
}

async fn put_user(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<UserBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<crate::tenancy::UserView>> {
    a.check(&h)?;
    let Json(body) = body.map_err(|e| bad(e.body_text()))?;
    if name.is_empty() || name == a.services.tenancy.superuser_role() {
        return Err(bad("that user name is not available"));
    }
    let tenancy = &a.services.tenancy;
    if !tenancy.tenants().iter().any(|t| t.name == body.tenant) {
        return Err(bad(format!("tenant {:?} does not exist", body.tenant)));
    }
    if body.password.is_some() && body.password_hash.is_some() {
        return Err(bad("set password or password_hash, not both"));
    }
    let user = UserConfig {
        name: name.clone(),
        password: body.password,
        password_hash: body.password_hash,
        scram_sha256: None,
        scram_sha512: None,
        certificate_cn: body.certificate_cn,
        tenant: body.tenant,
        namespace: body.namespace,
        permissions: body.permissions,
        limits: body.limits,
    };
    // The saved change holds the hash and SCRAM credentials, never the plain password.
    let stored = tenancy.put_user_config(&user).map_err(bad)?;
    a.record(|c| {
        c.users.insert(name.clone(), Some(stored));
    })?;
    get_user(State(a), h, Path(name)).await
}

async fn delete_user(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    a.check(&h)?;
    if !a.services.tenancy.delete_user(&name) {
        return Err(not_found("user"));
    }
    a.record(|c| {
        c.users.insert(name, None);
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct TokenQuery {
    expires_in: Option<String>,
}

async fn user_token(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<TokenQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    a.check(&h)?;
    if !a.services.tenancy.users().iter().any(|u| u.name == name) {
        return Err(not_found("user"));
    }
    let ttl = q
        .expires_in
        .map(|d| humantime::parse_duration(&d).map_err(bad))
        .transpose()?;
    let token = a
        .services
        .tenancy
        .sign_token(&name, ttl)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(serde_json::json!({ "token": token })))
}

/// The gateway's metrics in Prometheus' text format: usage per tenant (only `tenant`'s
/// series when one is named: what a tenant's own token may see), then, for the whole
/// gateway's view only, routing and login-cache counters.
pub fn prometheus_text(services: &Services, tenant: Option<&str>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut usage = services.quotas.tenant_usage();
    if let Some(only) = tenant {
        usage.retain(|(t, _)| t == only);
    }
    type Series = (&'static str, &'static str, fn(&crate::quota::Usage) -> f64);
    let series: [Series; 9] = [
        ("magnetar_tenant_connections", "gauge", |u| {
            u.connections as f64
        }),
        ("magnetar_tenant_subscriptions", "gauge", |u| {
            u.subscriptions as f64
        }),
        ("magnetar_tenant_published_messages_total", "counter", |u| {
            u.published_msgs as f64
        }),
        ("magnetar_tenant_published_bytes_total", "counter", |u| {
            u.published_bytes as f64
        }),
        ("magnetar_tenant_delivered_messages_total", "counter", |u| {
            u.delivered_msgs as f64
        }),
        ("magnetar_tenant_delivered_bytes_total", "counter", |u| {
            u.delivered_bytes as f64
        }),
        ("magnetar_tenant_throttled_messages_total", "counter", |u| {
            u.throttled_msgs as f64
        }),
        ("magnetar_tenant_refused_total", "counter", |u| {
            u.refused as f64
        }),
        ("magnetar_tenant_stored_bytes", "gauge", |u| {
            u.stored_bytes as f64
        }),
    ];
    for (name, kind, value) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (tenant, u) in &usage {
            let _ = writeln!(out, "{name}{{tenant=\"{tenant}\"}} {}", value(u));
        }
    }
    if tenant.is_some() {
        return out;
    }
    let r = services.router.stats();
    let _ = writeln!(out, "# TYPE magnetar_route_sources gauge");
    let _ = writeln!(out, "magnetar_route_sources {}", r.sources);
    let _ = writeln!(out, "# TYPE magnetar_routes gauge");
    let _ = writeln!(out, "magnetar_routes {}", r.routes);
    let _ = writeln!(out, "# TYPE magnetar_routed_messages_total counter");
    let _ = writeln!(out, "magnetar_routed_messages_total {}", r.routed);
    let _ = writeln!(out, "# TYPE magnetar_route_dropped_messages_total counter");
    let _ = writeln!(out, "magnetar_route_dropped_messages_total {}", r.dropped);
    let (hits, misses) = services.tenancy.login_cache_stats();
    let _ = writeln!(out, "# TYPE magnetar_login_cache_hits_total counter");
    let _ = writeln!(out, "magnetar_login_cache_hits_total {hits}");
    let _ = writeln!(out, "# TYPE magnetar_login_cache_misses_total counter");
    let _ = writeln!(out, "magnetar_login_cache_misses_total {misses}");
    out
}

/// Prometheus text format: usage per tenant.
async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    let out = prometheus_text(&a.services, None);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
