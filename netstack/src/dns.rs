//! Sans-IO DNS forwarder logic: query parsing, a TTL-honouring cache, and response
//! checks. DNS messages are parsed and built with `simple-dns`, never by hand (the
//! only raw access is the 16-bit transaction ID at offset 0, which every DNS message
//! has and which `simple-dns` would otherwise force a full re-encode for).

use simple_dns::{Packet, PacketFlag, RCODE};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Largest DNS message accepted from a client over UDP.
pub const MAX_QUERY_LEN: usize = 4096;
/// Largest DNS response accepted from upstream.
pub const MAX_RESPONSE_LEN: usize = 65_535;

/// What identifies a cacheable question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Lower-cased query name.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The DNSSEC "checking disabled" flag changes the answer.
    pub checking_disabled: bool,
}

/// A parsed client query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// `None` when the query is not cacheable (not exactly one question, or not a
    /// standard query).
    pub key: Option<CacheKey>,
}

/// Why a DNS message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("DNS message too long ({0} bytes)")]
    TooLong(usize),
    #[error("DNS message does not parse: {0}")]
    Parse(String),
    #[error("DNS message is a response, not a query")]
    NotAQuery,
}

fn key_of(packet: &Packet<'_>) -> Option<CacheKey> {
    if packet.questions.len() != 1 || packet.opcode() != simple_dns::OPCODE::StandardQuery {
        return None;
    }
    let q = packet.questions.first()?;
    Some(CacheKey {
        name: q.qname.to_string().to_ascii_lowercase(),
        qtype: u16::from(q.qtype),
        qclass: u16::from(q.qclass),
        checking_disabled: packet.has_flags(PacketFlag::CHECKING_DISABLED),
    })
}

/// Parses a client query.
pub fn parse_query(bytes: &[u8]) -> Result<Query, DnsError> {
    if bytes.len() > MAX_QUERY_LEN {
        return Err(DnsError::TooLong(bytes.len()));
    }
    let packet = Packet::parse(bytes).map_err(|e| DnsError::Parse(e.to_string()))?;
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Err(DnsError::NotAQuery);
    }
    Ok(Query {
        id: packet.id(),
        key: key_of(&packet),
    })
}

/// Checks an upstream response: it parses, it is a response, and it answers `key`.
/// Returns the TTL to cache it for (`None`: do not cache).
pub fn check_response(
    bytes: &[u8],
    expected_id: u16,
    key: Option<&CacheKey>,
    max_ttl: Duration,
) -> Result<Option<Duration>, DnsError> {
    if bytes.len() > MAX_RESPONSE_LEN {
        return Err(DnsError::TooLong(bytes.len()));
    }
    let packet = Packet::parse(bytes).map_err(|e| DnsError::Parse(e.to_string()))?;
    if !packet.has_flags(PacketFlag::RESPONSE) || packet.id() != expected_id {
        return Err(DnsError::NotAQuery);
    }
    let Some(key) = key else { return Ok(None) };
    if key_of(&packet).as_ref() != Some(key) {
        return Err(DnsError::Parse("response answers another question".into()));
    }
    if packet.has_flags(PacketFlag::TRUNCATION) {
        return Ok(None);
    }
    let rcode = packet.rcode();
    if rcode != RCODE::NoError && rcode != RCODE::NameError {
        return Ok(None);
    }
    // The smallest TTL of the answer and authority sections (for negative answers
    // that is the SOA's, RFC 2308); no record at all: not cached.
    let ttl = packet
        .answers
        .iter()
        .chain(packet.name_servers.iter())
        .map(|r| r.ttl)
        .min();
    Ok(ttl.map(|t| Duration::from_secs(u64::from(t)).min(max_ttl)))
}

#[derive(Debug)]
struct Entry {
    response: Vec<u8>,
    stored: Instant,
    expires: Instant,
}

/// A bounded, TTL-honouring cache of upstream responses.
#[derive(Debug)]
pub struct DnsCache {
    entries: HashMap<CacheKey, Entry>,
    max_entries: usize,
}

impl DnsCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stores `response` for `ttl` (nothing when `ttl` is zero).
    pub fn insert(&mut self, key: CacheKey, response: &[u8], ttl: Duration, now: Instant) {
        if ttl.is_zero() || self.max_entries == 0 {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&key) {
            self.expire(now);
            if self.entries.len() >= self.max_entries {
                // Still full: evict the entry closest to expiry.
                let victim = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                if let Some(v) = victim {
                    self.entries.remove(&v);
                }
            }
        }
        self.entries.insert(
            key,
            Entry {
                response: response.to_vec(),
                stored: now,
                expires: now + ttl,
            },
        );
    }

    /// Drops expired entries.
    pub fn expire(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.expires > now);
    }

    /// Answers `query` (the client's raw query) from the cache: the cached response
    /// with the client's ID and question, and TTLs reduced by the time spent cached.
    pub fn answer(&mut self, key: &CacheKey, query: &[u8], now: Instant) -> Option<Vec<u8>> {
        let entry = self.entries.get(key)?;
        if entry.expires <= now {
            self.entries.remove(key);
            return None;
        }
        let elapsed = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let client = Packet::parse(query).ok()?;
        let mut packet = Packet::parse(&entry.response).ok()?;
        packet.set_id(client.id());
        packet.questions = client.questions.clone();
        for r in packet
            .answers
            .iter_mut()
            .chain(packet.name_servers.iter_mut())
            .chain(packet.additional_records.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(elapsed);
        }
        packet.build_bytes_vec_compressed().ok()
    }
}

/// Builds a SERVFAIL (or other rcode) reply to a client's query, or a truncated
/// reply (TC set, no records) when the upstream answer does not fit the lease MTU.
pub fn error_reply(query: &[u8], rcode: RCODE, truncated: bool) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(q.id());
    reply.questions = q.questions.clone();
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if truncated {
        reply.set_flags(PacketFlag::TRUNCATION);
    }
    *reply.rcode_mut() = rcode;
    reply.build_bytes_vec_compressed().ok()
}

/// Rewrites the transaction ID of a DNS message in place (offset 0, 2 bytes).
pub fn set_id(message: &mut [u8], id: u16) {
    if let Some(field) = message.get_mut(0..2) {
        field.copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{A, RData};
    use simple_dns::{CLASS, Name, QCLASS, QTYPE, Question, ResourceRecord, TYPE};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    fn response(id: u16, name: &str, ttl: u32) -> Vec<u8> {
        let q = query(id, name);
        let q = Packet::parse(&q).unwrap();
        let mut p = Packet::new_reply(id);
        p.questions = q.questions.clone();
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked(name),
            CLASS::IN,
            ttl,
            RData::A(A {
                address: 0x7f00_0001,
            }),
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn query_key_is_case_insensitive() {
        let a = parse_query(&query(1, "Example.COM")).unwrap();
        let b = parse_query(&query(2, "example.com")).unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!((a.id, b.id), (1, 2));
    }

    #[test]
    fn responses_are_refused_as_queries() {
        assert_eq!(
            parse_query(&response(1, "a.test", 5)),
            Err(DnsError::NotAQuery)
        );
        assert!(parse_query(&[1, 2, 3]).is_err());
    }

    #[test]
    fn cache_honours_ttl_and_rewrites_id_and_ttl() {
        let now = Instant::now();
        let key = parse_query(&query(1, "a.test")).unwrap().key.unwrap();
        let resp = response(77, "a.test", 60);
        let ttl = check_response(&resp, 77, Some(&key), Duration::from_secs(3600))
            .unwrap()
            .unwrap();
        assert_eq!(ttl, Duration::from_secs(60));
        let mut cache = DnsCache::new(16);
        cache.insert(key.clone(), &resp, ttl, now);
        let later = now + Duration::from_secs(10);
        let ans = cache.answer(&key, &query(9, "A.test"), later).unwrap();
        let p = Packet::parse(&ans).unwrap();
        assert_eq!(p.id(), 9);
        assert_eq!(p.answers[0].ttl, 50);
        assert_eq!(p.questions[0].qname.to_string(), "A.test");
        assert!(cache.answer(&key, &query(9, "a.test"), now + ttl).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn mismatched_response_is_rejected() {
        let key = parse_query(&query(1, "a.test")).unwrap().key.unwrap();
        let resp = response(5, "b.test", 60);
        assert!(check_response(&resp, 5, Some(&key), Duration::from_secs(60)).is_err());
        assert!(check_response(&resp, 6, None, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn cache_is_bounded() {
        let now = Instant::now();
        let mut cache = DnsCache::new(4);
        for i in 0..10 {
            let name = format!("n{i}.test");
            let key = parse_query(&query(1, &name)).unwrap().key.unwrap();
            cache.insert(
                key,
                &response(1, &name, 30 + i),
                Duration::from_secs(30),
                now,
            );
        }
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn error_reply_keeps_question() {
        let r = error_reply(&query(3, "x.test"), RCODE::ServerFailure, true).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 3);
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(p.questions.len(), 1);
    }
}
