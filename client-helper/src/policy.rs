//! The policy file: which addresses a TUN may get, which routes and DNS servers are
//! allowed. One `key = value` per line, `#` starts a comment; see docs/client-helper.md.

use std::net::IpAddr;

/// A prefix of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
}

impl Prefix {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.trim().parse().ok()?;
        let len: u8 = l.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self { addr, len })
    }

    fn bits(a: &IpAddr) -> (u128, u8) {
        match a {
            IpAddr::V4(v) => (u128::from(u32::from(*v)) << 96, 32),
            IpAddr::V6(v) => (u128::from(*v), 128),
        }
    }

    /// Does this prefix contain all of `other` (same family, at least as long)?
    pub fn contains(&self, other: &Prefix) -> bool {
        let ((a, fa), (b, fb)) = (Self::bits(&self.addr), Self::bits(&other.addr));
        if fa != fb || other.len < self.len {
            return false;
        }
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        a & mask == b & mask
    }

    pub fn contains_addr(&self, a: IpAddr) -> bool {
        let len = if a.is_ipv4() { 32 } else { 128 };
        self.contains(&Prefix { addr: a, len })
    }
}

/// What the helper may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Prefixes a TUN address (with its prefix length) must lie in.
    pub tun_ranges: Vec<Prefix>,
    /// Prefixes every route must lie in.
    pub route_ranges: Vec<Prefix>,
    /// May a DNS server lie outside the TUN's own prefixes?
    pub dns_outside_tunnel: bool,
    /// The name given to TUNSETIFF (`%d` lets the kernel number it).
    pub tun_name: String,
}

impl Default for Policy {
    fn default() -> Self {
        let p = |s| Prefix::parse(s).into_iter();
        Policy {
            tun_ranges: p("100.64.0.0/10").chain(p("fd00::/8")).collect(),
            route_ranges: p("0.0.0.0/0").chain(p("::/0")).collect(),
            dns_outside_tunnel: false,
            tun_name: "vshare%d".to_owned(),
        }
    }
}

impl Policy {
    /// Parses a policy file. Range keys given in the file replace the defaults.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut p = Policy::default();
        let (mut tun, mut route) = (Vec::new(), Vec::new());
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |what: &str| PolicyError::Line {
                line: i + 1,
                what: what.to_owned(),
            };
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| err("expected key = value"))?;
            let v = v.trim();
            match k.trim() {
                "tun_range" => tun.push(Prefix::parse(v).ok_or_else(|| err("bad prefix"))?),
                "route_range" => route.push(Prefix::parse(v).ok_or_else(|| err("bad prefix"))?),
                "dns_outside_tunnel" => {
                    p.dns_outside_tunnel = v.parse().map_err(|_| err("expected true or false"))?
                }
                "tun_name" => {
                    if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(err("bad interface name"));
                    }
                    v.clone_into(&mut p.tun_name);
                }
                _ => return Err(err("unknown key")),
            }
        }
        if !tun.is_empty() {
            p.tun_ranges = tun;
        }
        if !route.is_empty() {
            p.route_ranges = route;
        }
        Ok(p)
    }

    pub fn tun_allowed(&self, p: &Prefix) -> bool {
        self.tun_ranges.iter().any(|r| r.contains(p))
    }

    pub fn route_allowed(&self, p: &Prefix) -> bool {
        self.route_ranges.iter().any(|r| r.contains(p))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prefixes_contain_what_they_should() {
        let p = |s| Prefix::parse(s).unwrap();
        assert!(p("100.64.0.0/10").contains(&p("100.64.0.2/24")));
        assert!(!p("100.64.0.0/10").contains(&p("100.0.0.0/8")));
        assert!(!p("100.64.0.0/10").contains(&p("10.64.0.2/24")));
        assert!(p("0.0.0.0/0").contains(&p("8.8.8.8/32")));
        assert!(!p("0.0.0.0/0").contains(&p("::/0")));
        assert!(p("fd00::/8").contains(&p("fd00:5653::2/64")));
        assert!(Prefix::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn policy_file_parses_and_refuses_unknown_keys() {
        let p = Policy::parse("# c\ntun_range = 10.0.0.0/8\ndns_outside_tunnel = true\n").unwrap();
        assert_eq!(p.tun_ranges, vec![Prefix::parse("10.0.0.0/8").unwrap()]);
        assert!(p.dns_outside_tunnel);
        assert_eq!(p.route_ranges, Policy::default().route_ranges);
        assert!(Policy::parse("colour = blue").is_err());
        assert!(Policy::parse("tun_range = 10/8").is_err());
    }
}
