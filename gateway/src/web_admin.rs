//! Pulsar's admin REST API (v2) on the web port, under the gateway's tenancy.
//!
//! The embedded broker answers the paths itself (its router, `magnetar_broker`'s `admin`
//! module, reached in-process: no second port, no loopback hop); this module decides who may
//! ask. A request carries `Authorization: Bearer <token>`:
//! - the admin API's static token (`admin.token`) or a JWT of `auth.superuser_role`: the
//!   superuser, who sees and changes everything;
//! - a user's JWT (the same tokens the broker port and the plugins accept): that user's
//!   tenant and namespace only. It may read its tenant (`GET tenants/{t}`), list
//!   (`GET tenants` shows its own tenant only, `GET namespaces/{t}` its own namespace only),
//!   create and delete its namespace, and do anything to the topics of its namespace
//!   (persistent and partitioned topics, stats, unload). Creating or deleting tenants and
//!   paths that name no tenant (other than `clusters`) are the superuser's;
//! - no token: the anonymous principal where the config allows anonymous access (its tenant
//!   and namespace as above), 401 otherwise. A bad token is 401 and counts as a failed login
//!   of the client's address, as everywhere in the tenancy.
//!
//! Refusals are Pulsar's: 401/403 with `{"reason": ...}`. The check matches raw path
//! segments against the principal's names exactly, so an escaped segment is refused, never
//! resolved to another tenant. Once checked, a request reaches the broker's router with the
//! gateway's own superuser token: the broker's per-role check would refuse a user
//! tenant-level reads that the gateway grants, and lists are filtered here instead.
//!
//! Per-topic permissions of users (`permissions` in the config) are not consulted: as on the
//! broker port, a user manages its whole namespace. With an external Pulsar cluster as the
//! backend there is no router in the process: the paths answer 501, and the cluster's own
//! admin API (its web service URL) is the one to use; proxying it would need a second
//! credential and URL in the config for little gain.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceExt;

use crate::host::Services;
use crate::tenancy::{Credentials, Principal, Tenancy};

/// Largest list answer this module filters (tenant and namespace lists are short).
const MAX_LIST_BODY: usize = 4 * 1024 * 1024;

/// The client's address, set by the web port on each request.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The admin REST API of the web port.
pub struct PulsarAdmin {
    tenancy: Arc<Tenancy>,
    /// What `/metrics` reports on.
    services: Arc<Services>,
    /// `admin.token`: a superuser credential.
    admin_token: Option<String>,
    /// The embedded broker's router and the token it is called with; `None`: an external
    /// cluster is the backend.
    broker: Option<(Router, Result<HeaderValue, String>)>,
}

impl PulsarAdmin {
    /// `broker`: the embedded broker's admin router, if the broker runs in this process.
    pub fn new(
        services: Arc<Services>,
        admin_token: Option<String>,
        broker: Option<Router>,
    ) -> Self {
        let tenancy = services.tenancy.clone();
        let broker = broker.map(|router| {
            let token = tenancy
                .sign_token(tenancy.superuser_role(), None)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string())
                });
            (router, token)
        });
        PulsarAdmin {
            tenancy,
            services,
            admin_token,
            broker,
        }
    }

    /// Who is asking (by the request's bearer token, from `peer`), or 401.
    async fn caller(&self, bearer: Option<&str>, peer: Option<IpAddr>) -> Result<Caller, Response> {
        let creds = match bearer {
            Some(token) => {
                if let Some(t) = &self.admin_token {
                    if crate::secret::constant_time_eq(t.as_bytes(), token.as_bytes()) {
                        return Ok(Caller::Superuser);
                    }
                }
                let verify = &self.tenancy.token_keys().verify;
                if magnetar_broker::auth::verify(verify, token)
                    .is_ok_and(|c| c.sub == self.tenancy.superuser_role())
                {
                    return Ok(Caller::Superuser);
                }
                Credentials::Token(token.to_string())
            }
            None if self.tenancy.allows_anonymous() => Credentials::Anonymous,
            None => {
                return Err(refusal(
                    StatusCode::UNAUTHORIZED,
                    "a bearer token is required",
                ))
            }
        };
        self.tenancy
            .authenticate(creds, peer)
            .await
            .map(Caller::Tenant)
            .map_err(|e| refusal(StatusCode::UNAUTHORIZED, &e.to_string()))
    }
}

/// Who a request acts as.
enum Caller {
    Superuser,
    Tenant(Principal),
}

/// What a request path touches (the segments after `/admin/v2/`).
#[derive(Debug, PartialEq, Eq)]
enum Scope<'a> {
    Clusters,
    TenantList,
    Tenant(&'a str),
    NamespaceList(&'a str),
    Namespace(&'a str, &'a str),
    Other,
}

fn scope(path: &str) -> Scope<'_> {
    let rest = path.strip_prefix("/admin/v2/").unwrap_or("");
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match segments.as_slice() {
        ["clusters", ..] => Scope::Clusters,
        ["tenants"] => Scope::TenantList,
        ["tenants", t] => Scope::Tenant(t),
        ["namespaces", t] => Scope::NamespaceList(t),
        ["namespaces", t, ns, ..] => Scope::Namespace(t, ns),
        ["persistent" | "non-persistent", t, ns, ..] => Scope::Namespace(t, ns),
        _ => Scope::Other,
    }
}

/// Whether `p` may make a request of `method` on `scope`.
fn allowed(p: &Principal, method: &Method, scope: &Scope<'_>) -> bool {
    let read = method == Method::GET || method == Method::HEAD;
    match scope {
        Scope::Clusters | Scope::TenantList => read,
        Scope::Tenant(t) | Scope::NamespaceList(t) => read && *t == p.tenant,
        Scope::Namespace(t, ns) => *t == p.tenant && *ns == p.namespace,
        Scope::Other => false,
    }
}

fn refusal(status: StatusCode, reason: &str) -> Response {
    (status, Json(json!({ "reason": reason }))).into_response()
}

/// A request's bearer token and its peer's address, for [`PulsarAdmin::caller`] (taken out
/// first: a `&Request` cannot be held across an await of a `Send` handler).
fn bearer_and_peer(req: &Request) -> (Option<String>, Option<IpAddr>) {
    let peer = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0.ip())
        .filter(|ip| !ip.is_unspecified());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    (bearer, peer)
}

/// `GET /metrics`, as on Pulsar's web port, in Prometheus' text format: the superuser sees
/// the whole gateway ([`crate::admin::prometheus_text`]), a user's token its own tenant's
/// series only (tenants do not learn of each other), no token 401 unless anonymous access
/// is allowed (then the anonymous principal's tenant).
pub async fn metrics(State(admin): State<Arc<PulsarAdmin>>, req: Request) -> Response {
    let (bearer, peer) = bearer_and_peer(&req);
    let tenant = match admin.caller(bearer.as_deref(), peer).await {
        Ok(Caller::Superuser) => None,
        Ok(Caller::Tenant(p)) => Some(p.tenant),
        Err(refused) => return refused,
    };
    let text = crate::admin::prometheus_text(&admin.services, tenant.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves one `/admin/v2/...` request: see the module docs.
pub async fn handle(State(admin): State<Arc<PulsarAdmin>>, req: Request) -> Response {
    let Some((router, token)) = &admin.broker else {
        return refusal(
            StatusCode::NOT_IMPLEMENTED,
            "the gateway serves the admin API of its embedded broker only; use the Pulsar cluster's own admin API",
        );
    };
    let (bearer, peer) = bearer_and_peer(&req);
    let caller = match admin.caller(bearer.as_deref(), peer).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let path = req.uri().path().to_string();
    let scope = scope(&path);
    let tenant = match &caller {
        Caller::Superuser => None,
        Caller::Tenant(p) if allowed(p, req.method(), &scope) => Some(p.clone()),
        Caller::Tenant(p) => {
            return refusal(
                StatusCode::FORBIDDEN,
                &format!(
                    "not authorized: this token manages {}/{} only",
                    p.tenant, p.namespace
                ),
            )
        }
    };
    let token = match token {
        Ok(t) => t.clone(),
        Err(e) => {
            tracing::warn!(error = %e, "the admin API cannot call the embedded broker");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot sign a token for its broker",
            );
        }
    };
    // A fresh request: the extensions of this router's match (its path parameters) would
    // confuse the broker router's own.
    let (mut parts, body) = req.into_parts();
    parts.headers.insert(header::AUTHORIZATION, token);
    let mut forward = Request::new(body);
    *forward.method_mut() = parts.method;
    *forward.uri_mut() = parts.uri;
    *forward.version_mut() = parts.version;
    *forward.headers_mut() = parts.headers;
    let response = match router.clone().oneshot(forward).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    match (tenant, scope) {
        (Some(p), Scope::TenantList) => keep_listed(response, |t| t == p.tenant).await,
        (Some(p), Scope::NamespaceList(_)) => {
            let own = format!("{}/{}", p.tenant, p.namespace);
            keep_listed(response, |n| n == own).await
        }
        _ => response,
    }
}

/// Keeps the names of a JSON list answer that `keep` accepts.
async fn keep_listed(response: Response, keep: impl Fn(&str) -> bool) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_LIST_BODY).await else {
        return refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the broker's answer",
        );
    };
    let Ok(names) = serde_json::from_slice::<Vec<String>>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let kept: Vec<String> = names.into_iter().filter(|n| keep(n)).collect();
    let mut response = Json(kept).into_response();
    *response.status_mut() = parts.status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_of_admin_paths() {
        assert_eq!(scope("/admin/v2/clusters"), Scope::Clusters);
        assert_eq!(scope("/admin/v2/tenants"), Scope::TenantList);
        assert_eq!(scope("/admin/v2/tenants/"), Scope::TenantList);
        assert_eq!(scope("/admin/v2/tenants/acme"), Scope::Tenant("acme"));
        assert_eq!(
            scope("/admin/v2/namespaces/acme"),
            Scope::NamespaceList("acme")
        );
        assert_eq!(
            scope("/admin/v2/namespaces/acme/default"),
            Scope::Namespace("acme", "default")
        );
        assert_eq!(
            scope("/admin/v2/persistent/acme/default/t/partitions"),
            Scope::Namespace("acme", "default")
        );
        assert_eq!(
            scope("/admin/v2/non-persistent/acme/default/t"),
            Scope::Namespace("acme", "default")
        );
        assert_eq!(scope("/admin/v2/brokers/health"), Scope::Other);
        assert_eq!(scope("/admin/v2/tenants/acme/extra"), Scope::Other);
    }

    #[test]
    fn a_tenant_principal_reaches_its_own_names_only() {
        let p = Principal {
            user: "alice".into(),
            tenant: "acme".into(),
            namespace: "default".into(),
        };
        let get = Method::GET;
        let put = Method::PUT;
        assert!(allowed(&p, &get, &Scope::TenantList));
        assert!(allowed(&p, &get, &Scope::Tenant("acme")));
        assert!(
            !allowed(&p, &put, &Scope::Tenant("acme")),
            "tenants are the operator's"
        );
        assert!(!allowed(&p, &get, &Scope::Tenant("globex")));
        assert!(allowed(&p, &get, &Scope::NamespaceList("acme")));
        assert!(!allowed(&p, &get, &Scope::NamespaceList("globex")));
        assert!(allowed(&p, &put, &Scope::Namespace("acme", "default")));
        assert!(!allowed(&p, &get, &Scope::Namespace("acme", "other")));
        assert!(!allowed(&p, &get, &Scope::Namespace("ac%6de", "default")));
        assert!(!allowed(&p, &get, &Scope::Other));
    }
}
