//! Which requests the HTTP server serves at all, checked before an endpoint
//! sees them: against pages in a browser that reach the server by DNS
//! rebinding or by a cross-site request, and against savepoints sent where
//! the operator did not allow.
//!
//! - **Host** (DNS rebinding): without a token, a request is served only
//!   when its `Host` names this machine: the host of the configured
//!   address, `localhost`, a loopback IP, or the IP the connection came in
//!   on. A page on `evil.example` whose name the attacker pointed at
//!   127.0.0.1 sends `Host: evil.example` and is refused (421). The port is
//!   not compared: a name is what rebinding changes, and an SSH tunnel from
//!   another local port keeps working. With a token, the token guards the
//!   data and any name is served (behind a proxy, under the proxy's name).
//! - **Control requests** (`POST`): refused when a browser says they come
//!   from another site (an `Origin` other than the server's own, `null`
//!   included; a `Sec-Fetch-Site` other than `same-origin` or `none`), and
//!   they must carry an [`CONTROL_HEADER`] header: a page can only send a
//!   custom header cross-site after a CORS preflight, which this server
//!   never grants (`OPTIONS` is 405). `millrace stop` sends it.
//! - **Savepoint locations**: `POST /stop?savepoint=URL` may only name a
//!   place under `[service] savepoint_targets` (compared as normalised
//!   paths, `..` refused; see [`SavepointTarget`]).
//!
//! Every refusal is counted in `millrace_http_refused_total{reason}` by the
//! caller, under [`Refusal::reason`].

use millrace_config::SavepointTarget;
use std::net::IpAddr;

/// The header a control request must carry (any non-empty value).
pub const CONTROL_HEADER: &str = "X-Millrace";

/// A request head: the request line and the header fields.
pub struct Head<'a> {
    pub method: &'a str,
    pub target: &'a str,
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Head<'a> {
    /// Splits the text of a request head (up to its blank line).
    pub fn parse(text: &'a str) -> Head<'a> {
        let mut lines = text.lines();
        let mut request = lines.next().unwrap_or("").split_whitespace();
        let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
        let fields = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(name, value)| (name.trim(), value.trim()))
            .collect();
        Head {
            method,
            target,
            fields,
        }
    }

    /// Every value of header `name` (names compare without case).
    pub fn values(&self, name: &'a str) -> impl Iterator<Item = &'a str> + '_ {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The one value of header `name`; `Err` when it is given more than once.
    fn single(&self, name: &'a str) -> Result<Option<&'a str>, ()> {
        let mut all = self.values(name);
        let first = all.next();
        match all.next() {
            Some(_) => Err(()),
            None => Ok(first),
        }
    }
}

/// Why a request is not served: the status, the label it is counted under
/// and the body that says what to do.
#[derive(Debug)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason,
            message: message.into(),
        }
    }
}

/// What the server accepts beyond the token: the names it answers to and
/// where a savepoint asked for over HTTP may go.
pub struct Access {
    /// The host of the configured address (lower case, no brackets).
    host: Option<String>,
    savepoint_targets: Vec<SavepointTarget>,
}

impl Access {
    /// `address` is the configured HTTP address (`[service] http`).
    pub fn new(address: Option<&str>, savepoint_targets: Vec<SavepointTarget>) -> Access {
        let host = address
            .and_then(host_and_port)
            .map(|(host, _)| host.to_ascii_lowercase());
        Access {
            host,
            savepoint_targets,
        }
    }

    /// Whether the `Host` of `head`, which came in on `local`, names this
    /// machine (see the module's docs).
    pub fn check_host(&self, head: &Head, local: IpAddr) -> Result<(), Refusal> {
        let bad = |why: &str| Refusal::new(400, "host", format!("{why}\n"));
        let value = match head.single("host") {
            Err(()) => return Err(bad("more than one Host header")),
            Ok(None) | Ok(Some("")) => return Err(bad("a Host header is required")),
            Ok(Some(v)) => v,
        };
        let Some((host, _port)) = host_and_port(value) else {
            return Err(bad(&format!(
                "`Host: {}` is not a host[:port]",
                value.escape_default()
            )));
        };
        let ours = host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .as_deref()
                .is_some_and(|h| host.eq_ignore_ascii_case(h))
            || host.parse::<IpAddr>().is_ok_and(|ip| {
                let ip = canonical(ip);
                ip.is_loopback() || ip == canonical(local)
            });
        if ours {
            return Ok(());
        }
        Err(Refusal::new(
            421,
            "host",
            format!(
                "`Host: {value}` is not this server: without [service] http_token only its \
                 configured address, localhost and loopback addresses are served (a guard \
                 against DNS rebinding); set http_token to serve other names\n"
            ),
        ))
    }

    /// The location a stop request's `savepoint=URL` asked for, normalised,
    /// if it lies under one of `[service] savepoint_targets`.
    pub fn savepoint(&self, url: &str) -> Result<SavepointTarget, Refusal> {
        const REASON: &str = "savepoint-target";
        if self.savepoint_targets.is_empty() {
            return Err(Refusal::new(
                403,
                REASON,
                "a savepoint asked for over HTTP goes only under [service] savepoint_targets, \
                 and none is set: add e.g. savepoint_targets = [\"s3://BUCKET/PREFIX\"] or \
                 [\"file:///var/lib/millrace/savepoints\"] (a plain POST /stop needs none)\n",
            ));
        }
        let asked = SavepointTarget::parse(url)
            .map_err(|why| Refusal::new(400, REASON, format!("savepoint: {why}\n")))?;
        if self.savepoint_targets.iter().any(|t| t.contains(&asked)) {
            return Ok(asked);
        }
        let allowed: Vec<String> = self
            .savepoint_targets
            .iter()
            .map(|t| t.to_string())
            .collect();
        Err(Refusal::new(
            403,
            REASON,
            format!(
                "savepoint `{asked}` is not under [service] savepoint_targets ({})\n",
                allowed.join(", ")
            ),
        ))
    }
}

/// Refuses a control request (one that changes something) that a browser
/// marks as coming from another site, or that lacks [`CONTROL_HEADER`].
pub fn check_control(head: &Head) -> Result<(), Refusal> {
    let cross = |why: String| {
        Refusal::new(
            403,
            "cross-site",
            format!("{why}: a control request is refused cross-site\n"),
        )
    };
    for site in head.values("sec-fetch-site") {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Err(cross(format!("Sec-Fetch-Site: {}", site.escape_default())));
        }
    }
    let host = head.single("host").ok().flatten();
    for origin in head.values("origin") {
        let own = host.is_some_and(|h| {
            ["http://", "https://"].iter().any(|scheme| {
                origin
                    .get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                    && origin[scheme.len()..].eq_ignore_ascii_case(h)
            })
        });
        if !own {
            return Err(cross(format!(
                "Origin: {} is not this server's",
                origin.escape_default()
            )));
        }
    }
    if head.values(CONTROL_HEADER).all(str::is_empty) {
        return Err(Refusal::new(
            403,
            "plain-request",
            format!(
                "a control request needs the header `{CONTROL_HEADER}: 1` (which a web page \
                 cannot send to another site); `millrace stop` sends it\n"
            ),
        ));
    }
    Ok(())
}

/// The host and port of `host[:port]` or `[v6]:port`; `None` when it is
/// not one (a bad port, an unbracketed IPv6 address, a character a host
/// name cannot hold).
fn host_and_port(value: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<std::net::Ipv6Addr>().ok()?;
        (ip, after)
    } else {
        let host = value.split(':').next().unwrap_or("");
        (host, &value[host.len()..])
    };
    let port = match port {
        "" => None,
        p => {
            let digits = p.strip_prefix(':')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
    };
    let name_like = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !value.starts_with('[') && !name_like(host) {
        return None;
    }
    Some((host, port))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head<'_> {
        Head::parse(text)
    }

    #[test]
    fn host_and_port_takes_names_ips_and_bracketed_v6_only() {
        assert_eq!(
            host_and_port("localhost:9464"),
            Some(("localhost", Some(9464)))
        );
        assert_eq!(host_and_port("127.0.0.1"), Some(("127.0.0.1", None)));
        assert_eq!(host_and_port("[::1]:80"), Some(("::1", Some(80))));
        assert_eq!(host_and_port("[::1]"), Some(("::1", None)));
        for bad in [
            "",
            ":80",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[evil]:80",
            "a:b:c",
            "h:99999",
            "h:-1",
            "h:+80",
            "a@b",
            "a b",
            "a/b",
            "h:80 ",
        ] {
            assert_eq!(host_and_port(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_host_is_served_when_it_names_this_machine() {
        let local: IpAddr = "10.1.2.3".parse().expect("ip");
        let access = Access::new(Some("w1.internal:9464"), Vec::new());
        let served = |host: &str| {
            access
                .check_host(
                    &head(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")),
                    local,
                )
                .map_err(|r| r.code)
        };
        for ok in [
            "w1.internal:9464",
            "W1.Internal",
            "localhost",
            "127.0.0.1:1",
            "127.9.9.9",
            "[::1]:9464",
            "[::ffff:127.0.0.1]",
            "10.1.2.3:9464",
            "[::ffff:10.1.2.3]:9464",
        ] {
            assert_eq!(served(ok), Ok(()), "{ok}");
        }
        for foreign in [
            "evil.example",
            "w1.internal.evil",
            "10.1.2.4",
            "[::2]",
            "localhost.evil",
        ] {
            assert_eq!(served(foreign), Err(421), "{foreign}");
        }
        for bad in ["", "[::1", "a@b:1"] {
            assert_eq!(served(bad), Err(400), "{bad}");
        }
        let two = head("GET / HTTP/1.1\r\nHost: localhost\r\nhost: localhost\r\n\r\n");
        assert_eq!(access.check_host(&two, local).map_err(|r| r.code), Err(400));
        let none = head("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            access.check_host(&none, local).map_err(|r| r.code),
            Err(400)
        );
        // An unspecified bind address names no host by itself.
        let any = Access::new(Some("0.0.0.0:9464"), Vec::new());
        let h = head("GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n");
        assert_eq!(any.check_host(&h, local).map_err(|r| r.code), Err(421));
    }

    #[test]
    fn a_control_request_must_be_same_origin_and_carry_the_header() {
        let check = |fields: &str| {
            check_control(&head(&format!(
                "POST /stop HTTP/1.1\r\nHost: 127.0.0.1:9464\r\n{fields}\r\n"
            )))
            .map_err(|r| r.reason)
        };
        assert_eq!(check("X-Millrace: 1\r\n"), Ok(()));
        assert_eq!(check("x-millrace: yes\r\nSec-Fetch-Site: none\r\n"), Ok(()));
        assert_eq!(
            check(
                "X-Millrace: 1\r\nOrigin: http://127.0.0.1:9464\r\nSec-Fetch-Site: same-origin\r\n"
            ),
            Ok(())
        );
        assert_eq!(
            check("X-Millrace: 1\r\nOrigin: HTTPS://127.0.0.1:9464\r\n"),
            Ok(())
        );
        for cross in [
            "Origin: null",
            "Origin: http://evil.example",
            "Origin: http://127.0.0.1:9465",
            "Origin: http://127.0.0.1:9464.evil.example",
            "Origin: http://127.0.0.1:9464/",
            "Origin: ftp://127.0.0.1:9464",
            "Origin: http://127.0.0.1:9464\r\nOrigin: http://evil.example",
            "Sec-Fetch-Site: cross-site",
            "Sec-Fetch-Site: same-site",
            "sec-fetch-site: same-origin\r\nsec-fetch-site: cross-site",
        ] {
            assert_eq!(
                check(&format!("X-Millrace: 1\r\n{cross}\r\n")),
                Err("cross-site"),
                "{cross}"
            );
        }
        assert_eq!(check(""), Err("plain-request"));
        assert_eq!(check("X-Millrace:\r\n"), Err("plain-request"));
        assert_eq!(check("Content-Type: text/plain\r\n"), Err("plain-request"));
        // An Origin with no Host to compare it to is not this server's.
        let no_host = head("POST /stop HTTP/1.1\r\nOrigin: http://x\r\nX-Millrace: 1\r\n\r\n");
        assert_eq!(
            check_control(&no_host).map_err(|r| r.reason),
            Err("cross-site")
        );
    }

    #[test]
    fn a_savepoint_goes_only_under_a_configured_target() {
        let none = Access::new(None, Vec::new());
        let r = none.savepoint("s3://b/p").expect_err("no targets");
        assert_eq!(r.code, 403);
        assert!(
            r.message.contains("[service] savepoint_targets"),
            "{}",
            r.message
        );
        let targets = vec![
            SavepointTarget::parse("s3://b/p").expect("target"),
            SavepointTarget::parse("file:///srv/sp").expect("target"),
        ];
        let some = Access::new(None, targets);
        assert_eq!(
            some.savepoint("s3://b/p//x/").map(|t| t.to_string()).ok(),
            Some("s3://b/p/x".to_owned())
        );
        assert_eq!(
            some.savepoint("/srv/sp/./a").map(|t| t.to_string()).ok(),
            Some("file:///srv/sp/a".to_owned())
        );
        assert_eq!(
            some.savepoint("s3://b/px").map_err(|r| r.code).err(),
            Some(403)
        );
        assert_eq!(
            some.savepoint("file:///srv/sp/../x")
                .map_err(|r| r.code)
                .err(),
            Some(400)
        );
        assert_eq!(
            some.savepoint("file:///srv").map_err(|r| r.code).err(),
            Some(403)
        );
    }
}
