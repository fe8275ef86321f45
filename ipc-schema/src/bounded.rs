//! Containers whose bound is checked while decoding, before they allocate.
//!
//! serde's `Vec<T>` trusts the encoded length up to a cautious pre-allocation; these
//! types refuse a length above their bound before reserving anything, so a message's
//! memory is bounded by its type, not only by its frame.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;

/// A value longer than its type allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{len} items where at most {max} are allowed")]
pub struct TooLong {
    pub len: usize,
    pub max: usize,
}

fn check(len: usize, max: usize) -> Result<(), TooLong> {
    if len > max {
        Err(TooLong { len, max })
    } else {
        Ok(())
    }
}

/// At most `N` bytes, encoded as postcard bytes (length varint + raw bytes).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BoundedBytes<const N: usize>(Vec<u8>);

impl<const N: usize> BoundedBytes<N> {
    pub fn new(bytes: Vec<u8>) -> Result<Self, TooLong> {
        check(bytes.len(), N)?;
        Ok(Self(bytes))
    }
    pub fn from_slice(bytes: &[u8]) -> Result<Self, TooLong> {
        check(bytes.len(), N)?;
        Ok(Self(bytes.to_vec()))
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl<const N: usize> fmt::Debug for BoundedBytes<N> {
    // Tickets and handshake messages are opaque: log their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl<const N: usize> Serialize for BoundedBytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedBytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = BoundedBytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {N} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                BoundedBytes::from_slice(v).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

/// At most `N` items, encoded as a postcard sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T, const N: usize> BoundedVec<T, N> {
    pub fn new(items: Vec<T>) -> Result<Self, TooLong> {
        check(items.len(), N)?;
        Ok(Self(items))
    }
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.0)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                let mut items = Vec::with_capacity(hint);
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// At most `N` bytes of UTF-8, encoded as a postcard string.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct BoundedString<const N: usize>(String);

impl<const N: usize> BoundedString<N> {
    pub fn new(s: impl Into<String>) -> Result<Self, TooLong> {
        let s = s.into();
        check(s.len(), N)?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> fmt::Display for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const N: usize> Serialize for BoundedString<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedString<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = BoundedString<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string of at most {N} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                BoundedString::new(v).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_str(V::<N>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_on_decode() {
        let long = postcard::to_stdvec(&vec![1u8; 5]).unwrap();
        assert!(postcard::from_bytes::<BoundedVec<u8, 4>>(&long).is_err());
        assert!(postcard::from_bytes::<BoundedVec<u8, 5>>(&long).is_ok());
        let bytes = postcard::to_stdvec(&BoundedBytes::<5>::new(vec![7; 5]).unwrap()).unwrap();
        assert!(postcard::from_bytes::<BoundedBytes<4>>(&bytes).is_err());
        assert_eq!(
            postcard::from_bytes::<BoundedBytes<5>>(&bytes)
                .unwrap()
                .as_slice(),
            &[7; 5]
        );
        let s = postcard::to_stdvec("hello").unwrap();
        assert!(postcard::from_bytes::<BoundedString<4>>(&s).is_err());
        assert_eq!(
            postcard::from_bytes::<BoundedString<5>>(&s)
                .unwrap()
                .as_str(),
            "hello"
        );
        // A sequence that claims 2^32 items is refused before anything is reserved.
        let claim = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(postcard::from_bytes::<BoundedVec<u64, 4>>(&claim).is_err());
    }
}
