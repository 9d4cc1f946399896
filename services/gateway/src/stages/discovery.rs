//! Replica discovery by DNS: a stage endpoint whose host is a name (not an IP address), such as a
//! Kubernetes headless Service `http://denoiser.ns.svc:50052`, stands for one replica per address the name
//! resolves to. The gateway resolves every such name at start and every `--resolve-interval-ms`: a new
//! address becomes a new replica (health-checked and described before it gets calls), an address that is
//! gone leaves the pool (its calls in flight finish), the others keep their state. A lookup that fails or
//! finds nothing keeps the replicas the name had, so a DNS hiccup never empties a stage.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use super::pool::{Pool, Replica};

/// Default period of the lookups.
pub const DEFAULT_RESOLVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A lookup of `host:port`.
pub type Lookup = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves names to addresses (the system resolver, or a fixed table in tests).
pub trait Resolve: Send + Sync {
    fn lookup(&self, host: String, port: u16) -> Lookup;
}

/// The system resolver (`getaddrinfo`, as `tokio::net::lookup_host`).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: String, port: u16) -> Lookup {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// An endpoint URI whose host is a DNS name: scheme, host and port (the scheme's default when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    scheme: String,
    host: String,
    port: u16,
}

/// `uri`'s DNS name, or `None` when its host is an IP address (or the URI does not parse: the channel
/// reports that).
pub fn named(uri: &str) -> Option<Named> {
    let u: tonic::codegen::http::Uri = uri.parse().ok()?;
    let host = u.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return None;
    }
    let scheme = u.scheme_str().unwrap_or("http").to_string();
    let port = u
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some(Named {
        scheme,
        host: host.to_string(),
        port,
    })
}

impl Named {
    /// The URI of one address of the name.
    fn uri(&self, addr: SocketAddr) -> String {
        match addr.ip() {
            IpAddr::V4(ip) => format!("{}://{ip}:{}", self.scheme, addr.port()),
            IpAddr::V6(ip) => format!("{}://[{ip}]:{}", self.scheme, addr.port()),
        }
    }
}

impl Pool {
    /// Resolves the pool's DNS names and updates its replicas (see the module); true when they changed.
    pub async fn rediscover(&self, resolver: &dyn Resolve) -> bool {
        let current = self.replicas();
        let mut next: Vec<Arc<Replica>> = Vec::new();
        for (target, uri) in self.targets.iter().enumerate() {
            let kept = current.iter().filter(|r| r.target == target);
            let Some(name) = named(uri) else {
                next.extend(kept.cloned());
                continue;
            };
            let addrs: BTreeSet<String> = match resolver.lookup(name.host.clone(), name.port).await
            {
                Ok(a) if !a.is_empty() => a.into_iter().map(|a| name.uri(a)).collect(),
                Ok(_) => {
                    tracing::warn!(stage = %self.stage, %uri, "DNS name resolved to no address; keeping its replicas");
                    next.extend(kept.cloned());
                    continue;
                }
                Err(e) => {
                    tracing::warn!(stage = %self.stage, %uri, error = %e, "DNS lookup failed; keeping its replicas");
                    next.extend(kept.cloned());
                    continue;
                }
            };
            let mut seen = BTreeSet::new();
            for r in kept {
                if addrs.contains(&r.uri) {
                    seen.insert(r.uri.clone());
                    next.push(r.clone());
                } else {
                    tracing::info!(stage = %self.stage, name = %uri, replica = %r.uri, "replica left the DNS name");
                }
            }
            for a in addrs.difference(&seen) {
                match self.shared.new_replica(target, a, Some(&name.host)) {
                    Ok(r) => {
                        tracing::info!(stage = %self.stage, name = %uri, replica = %a, "replica found by DNS");
                        next.push(r);
                    }
                    Err(e) => {
                        tracing::warn!(stage = %self.stage, replica = %a, error = %e, "unusable address")
                    }
                }
            }
        }
        let changed = next.len() != current.len()
            || next.iter().zip(current.iter()).any(|(a, b)| a.id != b.id);
        if changed {
            if let Ok(mut l) = self.shared.replicas.write() {
                *l = Arc::new(next);
            }
            self.dispatch();
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::error::StageName;

    /// Answers from a table that the test changes.
    struct Table(Mutex<HashMap<String, std::io::Result<Vec<SocketAddr>>>>);

    impl Table {
        fn set(&self, host: &str, answer: std::io::Result<Vec<&str>>) {
            let answer = answer.map(|v| v.iter().map(|a| a.parse().expect("addr")).collect());
            self.0.lock().expect("lock").insert(host.into(), answer);
        }
    }

    impl Resolve for Table {
        fn lookup(&self, host: String, _port: u16) -> Lookup {
            let a = match self.0.lock().expect("lock").get(&host) {
                Some(Ok(v)) => Ok(v.clone()),
                Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                None => Err(std::io::Error::other("no such host")),
            };
            Box::pin(async move { a })
        }
    }

    fn uris(p: &Pool) -> Vec<String> {
        p.replicas().iter().map(|r| r.uri.clone()).collect()
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(named("http://127.0.0.1:5"), None);
        assert_eq!(named("http://[::1]:5"), None);
        let n = named("http://denoiser.ns.svc:50052").expect("a name");
        assert_eq!((n.host.as_str(), n.port), ("denoiser.ns.svc", 50052));
        assert_eq!(
            n.uri("[::1]:50052".parse().expect("addr")),
            "http://[::1]:50052"
        );
        assert_eq!(named("https://vae").expect("a name").port, 443);
    }

    #[tokio::test]
    async fn a_name_is_one_replica_per_address_and_follows_the_answers() {
        let p = Pool::new(
            StageName::Denoiser,
            &["http://10.0.0.9:1".into(), "http://dn.svc:50052".into()],
            None,
        )
        .expect("valid");
        let dns = Table(Mutex::new(HashMap::new()));
        dns.set("dn.svc", Ok(vec!["127.0.0.1:50052", "[::1]:50052"]));
        assert!(p.rediscover(&dns).await);
        assert_eq!(
            uris(&p),
            vec![
                "http://10.0.0.9:1",
                "http://127.0.0.1:50052",
                "http://[::1]:50052"
            ],
            "the fixed address stays; the name is one replica per address"
        );
        let v4 = p.replicas()[1].clone();
        v4.set_healthy(true);
        assert!(!p.rediscover(&dns).await, "same answer, same replicas");
        // A pod goes away, another comes.
        dns.set("dn.svc", Ok(vec!["127.0.0.1:50052", "127.0.0.2:50052"]));
        assert!(p.rediscover(&dns).await);
        assert_eq!(
            uris(&p),
            vec![
                "http://10.0.0.9:1",
                "http://127.0.0.1:50052",
                "http://127.0.0.2:50052"
            ]
        );
        assert!(
            Arc::ptr_eq(&p.replicas()[1], &v4) && v4.is_healthy(),
            "a replica that stays keeps its state"
        );
        // Lookups that fail or find nothing keep what the name had.
        dns.set("dn.svc", Err(std::io::Error::other("SERVFAIL")));
        assert!(!p.rediscover(&dns).await);
        dns.set("dn.svc", Ok(vec![]));
        assert!(!p.rediscover(&dns).await);
        assert_eq!(p.replicas().len(), 3);
        let ids: BTreeSet<usize> = p.replicas().iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 3, "ids are unique");
    }

    #[tokio::test]
    async fn localhost_resolves_with_the_system_resolver() {
        let p = Pool::new(StageName::Vae, &["http://localhost:50099".into()], None).expect("valid");
        assert!(p.rediscover(&SystemResolver).await);
        let got = uris(&p);
        assert!(
            got.iter()
                .all(|u| u == "http://127.0.0.1:50099" || u == "http://[::1]:50099"),
            "{got:?}"
        );
        assert!(!got.is_empty());
    }
}
