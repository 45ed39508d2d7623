//! Which webhook targets muxi-rt is willing to POST to.
//!
//! A webhook URL comes from a caller, so without care it is a server-side request
//! forgery primitive: "tell me when done at http://169.254.169.254/..." would make
//! the runtime call the cloud metadata service, the loopback admin port, or a
//! neighbour on the private network. A target is refused when ANY address its host
//! resolves to is loopback, private, link-local, unspecified, broadcast, multicast,
//! shared (CGNAT, 100.64/10), benchmarking (198.18/15) or a cloud metadata
//! address, including those embedded in IPv6: IPv4-mapped and -compatible, NAT64
//! (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4 (2002::/16) and Teredo
//! (2001::/32, its server and its client address). Hosts in the operator's
//! allow-list (compared case-insensitively) skip the check.
//!
//! # DNS rebinding
//!
//! Checking a name at submission time is not enough: its DNS answer can change
//! before the webhook is sent (or between our check and the HTTP client's own
//! lookup). Two things close that gap:
//!
//! 1. the dispatcher calls [`check_target`] again right before each attempt, and
//! 2. the HTTP client built by [`super::deliver::webhook_client`] resolves names
//!    through [`GuardedResolver`], which applies the same classifier to the very
//!    addresses the connection will use and fails the lookup when any is refused.
//!    IP-literal hosts never reach a resolver; they are covered by (1).
//!
//! That client also ignores proxy settings (a proxy would resolve the target itself,
//! out of our sight) and never follows redirects (a redirect could point anywhere).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use crate::error::{ApiError, Code};

/// How long resolving a webhook host may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address is not a webhook target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Private,
    LinkLocal,
    Unspecified,
    Broadcast,
    Multicast,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedCgnat,
    /// 169.254.169.254, fd00:ec2::254.
    CloudMetadata,
    /// 198.18.0.0/15, network benchmarking (often routed to lab networks).
    Benchmarking,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Multicast => "multicast",
            AddressClass::SharedCgnat => "shared (CGNAT)",
            AddressClass::CloudMetadata => "cloud metadata",
            AddressClass::Benchmarking => "benchmarking",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class that makes `ip` a refused target, or `None` for an ordinary address.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, ..] = ip.octets();
    Some(if ip == Ipv4Addr::new(169, 254, 169, 254) {
        AddressClass::CloudMetadata
    } else if a == 0 {
        // 0.0.0.0/8 "this network": 0.x.x.x reaches the local host on Linux.
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() {
        AddressClass::Private
    } else if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_broadcast() {
        AddressClass::Broadcast
    } else if a == 100 && (b & 0xc0) == 64 {
        AddressClass::SharedCgnat
    } else if a == 198 && (b & 0xfe) == 18 {
        AddressClass::Benchmarking
    } else if ip.is_multicast() {
        AddressClass::Multicast
    } else {
        return None;
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    const METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    let segments = ip.segments();
    Some(if ip == METADATA {
        AddressClass::CloudMetadata
    } else if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if let Some(v4) = ip.to_ipv4() {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible) reach the IPv4 address.
        return classify_v4(v4);
    } else if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] {
        // NAT64 64:ff9b::/96 embeds an IPv4 address in its last 32 bits.
        return classify_v4(v4_at(&ip, [12, 13, 14, 15]));
    } else if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1 {
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215), with any RFC 6052 prefix
        // length from /48 to /96: refused if any reading is.
        let octets = [[6, 7, 9, 10], [7, 9, 10, 11], [9, 10, 11, 12], [12, 13, 14, 15]];
        return octets.into_iter().find_map(|at| classify_v4(v4_at(&ip, at)));
    } else if segments[0] == 0x2002 {
        // 6to4 2002:AABB:CCDD::/48 relays to the IPv4 address AA.BB.CC.DD.
        return classify_v4(v4_at(&ip, [2, 3, 4, 5]));
    } else if segments[0] == 0x2001 && segments[1] == 0 {
        // Teredo 2001:0::/32: the server's IPv4 address, then the client's,
        // bit-inverted, in the last 32 bits.
        let server = v4_at(&ip, [4, 5, 6, 7]);
        let client = Ipv4Addr::from(!u32::from(v4_at(&ip, [12, 13, 14, 15])));
        return classify_v4(client).or_else(|| classify_v4(server));
    } else if (segments[0] & 0xfe00) == 0xfc00 || (segments[0] & 0xffc0) == 0xfec0 {
        // fc00::/7 unique local; fec0::/10 the deprecated site-local.
        AddressClass::Private
    } else if (segments[0] & 0xffc0) == 0xfe80 {
        AddressClass::LinkLocal
    } else if ip.is_multicast() {
        AddressClass::Multicast
    } else {
        return None;
    })
}

/// The IPv4 address made of four octets of `ip`.
fn v4_at(ip: &Ipv6Addr, at: [usize; 4]) -> Ipv4Addr {
    let octets = ip.octets();
    Ipv4Addr::new(octets[at[0]], octets[at[1]], octets[at[2]], octets[at[3]])
}

/// Whether `host` (as in a URL: IPv6 in brackets or not) is in the allow-list.
pub fn is_allowed(host: &str, allow_hosts: &[String]) -> bool {
    let normalise =
        |h: &str| h.trim().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    let host = normalise(host);
    allow_hosts.iter().any(|allowed| normalise(allowed) == host)
}

/// A resolved address that is not a webhook target.
#[derive(Debug, Clone)]
pub struct RefusedAddress {
    pub host: String,
    pub addr: IpAddr,
    pub class: AddressClass,
}

impl fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.trim_start_matches('[').trim_end_matches(']') == self.addr.to_string() {
            write!(f, "webhook host {} is a {} address", self.host, self.class)
        } else {
            write!(f, "webhook host {} resolves to {}, a {} address", self.host, self.addr, self.class)
        }
    }
}

impl std::error::Error for RefusedAddress {}

/// Why a target was not accepted; [`check_target`] turns it into an [`ApiError`].
#[derive(Debug)]
pub(crate) enum TargetError {
    /// Not an absolute http(s) URL with a host.
    Invalid(String),
    /// Resolves to a refused address.
    Refused(RefusedAddress),
    /// The host could not be resolved (possibly a passing DNS failure).
    Unresolvable(String),
}

impl From<TargetError> for ApiError {
    fn from(err: TargetError) -> Self {
        match err {
            TargetError::Invalid(message) | TargetError::Unresolvable(message) => {
                ApiError::new(Code::InvalidWebhookUrl, message)
            }
            TargetError::Refused(refused) => ApiError::new(Code::WebhookTargetRefused, refused.to_string()),
        }
    }
}

/// Checks that `url` is an acceptable webhook target; returns it parsed.
///
/// The URL must be absolute, `http` or `https`, and have a host. Unless the host is
/// allow-listed, every address it resolves to (IP literals are taken as they are,
/// without DNS) must pass [`classify`]. Errors: [`Code::InvalidWebhookUrl`] for a
/// malformed or unresolvable URL, [`Code::WebhookTargetRefused`] for a refused address.
pub async fn check_target(url: &str, allow_hosts: &[String]) -> Result<Url, ApiError> {
    inspect_target(url, allow_hosts).await.map_err(ApiError::from)
}

/// [`check_target`] with the reason kept apart, so the dispatcher can retry a DNS
/// failure but give up on a refused address.
pub(crate) async fn inspect_target(url: &str, allow_hosts: &[String]) -> Result<Url, TargetError> {
    let parsed = Url::parse(url).map_err(|e| TargetError::Invalid(format!("webhook_url is not a valid URL: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(TargetError::Invalid(format!("webhook_url must use http or https, not {other}"))),
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err(TargetError::Invalid("webhook_url has no host".into()));
    };
    if is_allowed(host, allow_hosts) {
        return Ok(parsed);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return match classify(ip) {
            Some(class) => Err(TargetError::Refused(RefusedAddress { host: host.to_string(), addr: ip, class })),
            None => Ok(parsed),
        };
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let addrs = resolve(host, port).await.map_err(TargetError::Unresolvable)?;
    refuse_any(host, &addrs).map_err(TargetError::Refused)?;
    Ok(parsed)
}

/// Resolves `host`, bounded by [`RESOLVE_TIMEOUT`]; errors are readable messages.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    let addrs: Vec<SocketAddr> = match lookup {
        Err(_) => return Err(format!("cannot resolve webhook host {host}: timed out")),
        Ok(Err(e)) => return Err(format!("cannot resolve webhook host {host}: {e}")),
        Ok(Ok(addrs)) => addrs.collect(),
    };
    if addrs.is_empty() {
        return Err(format!("cannot resolve webhook host {host}: no addresses"));
    }
    Ok(addrs)
}

/// The first refused address among `addrs`, as an error.
fn refuse_any(host: &str, addrs: &[SocketAddr]) -> Result<(), RefusedAddress> {
    match addrs.iter().find_map(|a| classify(a.ip()).map(|class| (a.ip(), class))) {
        Some((addr, class)) => Err(RefusedAddress { host: host.to_string(), addr, class }),
        None => Ok(()),
    }
}

/// A DNS resolver for the webhook HTTP client that fails any lookup yielding a
/// refused address (unless the name is allow-listed), so the connection is only
/// ever made to addresses that passed the check: no window for DNS rebinding.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow_hosts: Arc<[String]>,
}

impl GuardedResolver {
    pub fn new(allow_hosts: &[String]) -> Self {
        GuardedResolver { allow_hosts: allow_hosts.into() }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allowed = is_allowed(&host, &self.allow_hosts);
        Box::pin(async move {
            // Port 0: the HTTP client puts the URL's port in.
            let addrs = resolve(&host, 0).await?;
            if !allowed {
                refuse_any(&host, &addrs)?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<AddressClass> {
        classify(s.parse().expect("test address"))
    }

    #[test]
    fn classifier_refuses_internal_addresses() {
        use AddressClass::*;
        let cases = [
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", CloudMetadata),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("255.255.255.255", Broadcast),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.254", SharedCgnat),
            ("224.0.0.1", Multicast),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fd00:ec2::254", CloudMetadata),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:169.254.169.254", CloudMetadata),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", CloudMetadata),
            ("ff02::1", Multicast),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            // 6to4 of 127.0.0.1 and 10.0.0.1.
            ("2002:7f00:1::1", Loopback),
            ("2002:a00:1::", Private),
            // Teredo: client 192.168.1.1 (inverted: 3f57:fefe), public server.
            ("2001:0:4136:e378:8000:63bf:3f57:fefe", Private),
            // Teredo: server 169.254.169.254, public client 8.8.8.8 (inverted f7f7:f7f7).
            ("2001:0:a9fe:a9fe::f7f7:f7f7", CloudMetadata),
            // Local-use NAT64 with a /48 prefix (10.0.0.1 around the u octet) and a /96.
            ("64:ff9b:1:a00:0:100::", Private),
            ("64:ff9b:1:808:8:8:7f00:1", Loopback),
        ];
        for (addr, expected) in cases {
            assert_eq!(class(addr), Some(expected), "{addr}");
        }
    }

    #[test]
    fn classifier_accepts_public_addresses() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "172.15.255.255",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "198.17.255.255",
            "198.20.0.1",
            "2002:808:808::1",
            // Teredo, public server 65.54.227.120 and public client 8.8.8.8.
            "2001:0:4136:e378::f7f7:f7f7",
            "2001:db9::1",
        ] {
            assert_eq!(class(addr), None, "{addr}");
        }
    }

    fn allow(hosts: &[&str]) -> Vec<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[tokio::test]
    async fn ip_literals_are_checked_without_dns() {
        let err = check_target("http://127.0.0.1:8080/hook", &[]).await.unwrap_err();
        assert_eq!(err.code, Code::WebhookTargetRefused);
        assert!(err.message.contains("127.0.0.1") && err.message.contains("loopback"), "{}", err.message);

        let err = check_target("http://[::ffff:169.254.169.254]/latest", &[]).await.unwrap_err();
        assert_eq!(err.code, Code::WebhookTargetRefused);
        assert!(err.message.contains("cloud metadata"), "{}", err.message);

        // The URL parser normalises odd IPv4 spellings before we look.
        let err = check_target("http://0x7f.1/", &[]).await.unwrap_err();
        assert_eq!(err.code, Code::WebhookTargetRefused);

        let url = check_target("https://8.8.8.8/hook", &[]).await.expect("public literal");
        assert_eq!(url.host_str(), Some("8.8.8.8"));
    }

    #[tokio::test]
    async fn allow_listed_hosts_pass() {
        let url = check_target("http://127.0.0.1:9/hook", &allow(&["127.0.0.1"])).await.expect("allowed");
        assert_eq!(url.port(), Some(9));
        check_target("http://LocalHost:9/", &allow(&["localhost"])).await.expect("case-insensitive");
        check_target("http://[::1]:9/", &allow(&["::1"])).await.expect("bracketed v6");
    }

    #[tokio::test]
    async fn names_are_resolved_and_checked() {
        // `localhost` resolves without network access.
        let err = check_target("http://localhost:9/", &[]).await.unwrap_err();
        assert_eq!(err.code, Code::WebhookTargetRefused);
        assert!(err.message.contains("localhost") && err.message.contains("loopback"), "{}", err.message);
    }

    #[tokio::test]
    async fn malformed_urls_are_invalid() {
        let err = check_target("ftp://example.com/x", &[]).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidWebhookUrl);
        assert!(err.message.contains("ftp"), "{}", err.message);

        for bad in ["not a url", "/relative/path", "http://", "file:///etc/passwd"] {
            let err = check_target(bad, &[]).await.unwrap_err();
            assert_eq!(err.code, Code::InvalidWebhookUrl, "{bad}");
        }
    }

    #[tokio::test]
    async fn guarded_resolver_refuses_internal_names() {
        let resolver = GuardedResolver::new(&[]);
        let err = match resolver.resolve("localhost".parse().expect("name")).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<RefusedAddress>().is_some(), "{err}");

        let resolver = GuardedResolver::new(&allow(&["localhost"]));
        let addrs: Vec<_> = match resolver.resolve("localhost".parse().expect("name")).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => panic!("allowed: {e}"),
        };
        assert!(!addrs.is_empty());
    }
}
