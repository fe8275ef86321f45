//! The resume ticket kept in the state dir, so that `vpnshare connect` started again
//! resumes the previous session (same lease, the laptop's TCP connections survive).
//!
//! The file (`resume-ticket`, mode 0600) is opened before the session confines itself
//! (the confined session cannot open files) and holds two fixed slots written in turn
//! with `pwrite` + `fdatasync`; each slot carries a sequence number, the gateway's key
//! and a checksum. A crash (or `kill -9`) while writing damages at most the slot being
//! written, whose checksum then fails: reading takes the valid slot with the highest
//! sequence, so the file always yields the old or the new ticket, never a torn one.
//! The same guarantee as write-fsync-rename, without `open`/`rename` in the sandbox.
//! The ticket itself is sealed and authenticated by the gateway; the checksum only
//! detects torn writes.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use crate::core::MAX_TICKET;

/// File name inside the state dir.
pub const TICKET_FILE: &str = "resume-ticket";
const MAGIC: &[u8; 4] = b"VSRT";
/// magic, sequence, gateway key, length, ticket, checksum.
const HEADER: usize = 4 + 8 + 32 + 2;
const SLOT: usize = HEADER + MAX_TICKET + 8;

/// FNV-1a, 64 bits: detects a torn slot (not an adversary; the ticket is sealed).
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode(seq: u64, gateway: &[u8; 32], ticket: &[u8]) -> Option<Vec<u8>> {
    if ticket.is_empty() || ticket.len() > MAX_TICKET {
        return None;
    }
    let mut slot = Vec::with_capacity(SLOT);
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&seq.to_le_bytes());
    slot.extend_from_slice(gateway);
    slot.extend_from_slice(&u16::try_from(ticket.len()).ok()?.to_le_bytes());
    slot.extend_from_slice(ticket);
    slot.resize(SLOT - 8, 0);
    let sum = checksum(&slot);
    slot.extend_from_slice(&sum.to_le_bytes());
    Some(slot)
}

/// A slot's sequence and ticket, if it is intact and for `gateway`.
fn decode(slot: &[u8], gateway: &[u8; 32]) -> Option<(u64, Vec<u8>)> {
    if slot.len() != SLOT || slot.get(..4)? != MAGIC {
        return None;
    }
    let (body, sum) = slot.split_at(SLOT - 8);
    if checksum(body).to_le_bytes() != sum {
        return None;
    }
    let seq = u64::from_le_bytes(body.get(4..12)?.try_into().ok()?);
    if body.get(12..44)? != gateway {
        return None;
    }
    let len = usize::from(u16::from_le_bytes(body.get(44..46)?.try_into().ok()?));
    if len == 0 || len > MAX_TICKET {
        return None;
    }
    Some((seq, body.get(HEADER..HEADER + len)?.to_vec()))
}

/// The newest intact ticket for `gateway` in a file's contents.
fn newest(data: &[u8], gateway: &[u8; 32]) -> Option<(u64, Vec<u8>)> {
    data.chunks(SLOT)
        .take(2)
        .filter_map(|s| decode(s, gateway))
        .max_by_key(|(seq, _)| *seq)
}

/// The open ticket file.
#[derive(Debug)]
pub struct TicketStore {
    file: File,
    gateway: [u8; 32],
    seq: u64,
}

impl TicketStore {
    /// Opens (creates, mode 0600) the ticket file in `state_dir`; returns the store and
    /// the newest ticket kept for `gateway`, if any.
    pub fn open(state_dir: &Path, gateway: [u8; 32]) -> std::io::Result<(Self, Option<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(state_dir.join(TICKET_FILE))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let found = newest(&data, &gateway);
        let seq = found.as_ref().map_or(0, |(s, _)| *s);
        Ok((Self { file, gateway, seq }, found.map(|(_, t)| t)))
    }

    /// The descriptor, to keep open through confinement.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes `ticket` into the older slot and syncs it.
    pub fn save(&mut self, ticket: &[u8]) -> std::io::Result<()> {
        let seq = self.seq.wrapping_add(1);
        let slot = encode(seq, &self.gateway, ticket).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "ticket length")
        })?;
        let offset = if seq % 2 == 0 { 0 } else { SLOT as u64 };
        self.file.write_all_at(&slot, offset)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
    }
}

impl TicketStore {
    /// Forgets the kept ticket (the gateway refused it): both slots are overwritten
    /// with zeros, whose checksum fails, and synced. A restarted `connect` then does a
    /// full handshake instead of presenting the refused ticket again.
    pub fn forget(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&vec![0u8; 2 * SLOT], 0)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vpnshare-ticket-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn saved_tickets_come_back_newest_first_and_only_for_their_gateway() {
        let d = dir("roundtrip");
        let (mut st, none) = TicketStore::open(&d, [1; 32]).unwrap();
        assert!(none.is_none());
        let mode = std::fs::metadata(d.join(TICKET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        st.save(&[7; 130]).unwrap();
        st.save(&[8; 131]).unwrap();
        st.save(&[9; 132]).unwrap();
        drop(st);
        let (mut st, t) = TicketStore::open(&d, [1; 32]).unwrap();
        assert_eq!(t, Some(vec![9; 132]));
        st.save(&[10; 100]).unwrap();
        assert_eq!(
            TicketStore::open(&d, [1; 32]).unwrap().1,
            Some(vec![10; 100])
        );
        assert_eq!(
            TicketStore::open(&d, [2; 32]).unwrap().1,
            None,
            "another gateway"
        );
        assert!(st.save(&[0; MAX_TICKET + 1]).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_write_leaves_the_previous_ticket() {
        let d = dir("torn");
        let (mut st, _) = TicketStore::open(&d, [1; 32]).unwrap();
        st.save(&[7; 130]).unwrap(); // seq 1: slot 1
        st.save(&[8; 130]).unwrap(); // seq 2: slot 0
        drop(st);
        let path = d.join(TICKET_FILE);
        // Every possible cut of the next write (seq 3 → slot 1) over the old contents.
        let before = std::fs::read(&path).unwrap();
        let next = encode(3, &[1; 32], &[9; 130]).unwrap();
        for cut in [0, 1, 4, 20, HEADER, HEADER + 60, SLOT - 9, SLOT - 1, SLOT] {
            let mut data = before.clone();
            data[SLOT..SLOT + cut].copy_from_slice(&next[..cut]);
            let got = newest(&data, &[1; 32]).map(|(_, t)| t);
            if cut == SLOT {
                assert_eq!(got, Some(vec![9; 130]));
            } else {
                assert_eq!(got, Some(vec![8; 130]), "cut at {cut}");
            }
        }
        // A garbage or short file yields nothing, never an error.
        assert_eq!(newest(&[0xAB; 100], &[1; 32]), None);
        assert_eq!(newest(&[], &[1; 32]), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_forgotten_ticket_does_not_come_back_and_a_new_one_does() {
        let d = dir("forget");
        let gw = [3u8; 32];
        let (mut st, _) = TicketStore::open(&d, gw).unwrap();
        st.save(&[1; 100]).unwrap();
        st.save(&[2; 100]).unwrap();
        st.forget().unwrap();
        let (mut st, t) = TicketStore::open(&d, gw).unwrap();
        assert_eq!(t, None);
        st.save(&[4; 90]).unwrap();
        let (_, t) = TicketStore::open(&d, gw).unwrap();
        assert_eq!(t, Some(vec![4; 90]));
        let _ = std::fs::remove_dir_all(&d);
    }
}
