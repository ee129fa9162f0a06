//! Lock tokens: 128 random bits from the operating system, hex-encoded so that
//! they read well in `redis-cli`.

use std::fmt;

/// The value a holder writes under a lock key; only its holder knows it, so only
/// its holder can release or extend the lock.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; 32]);

impl Token {
    /// A fresh token from the OS random number generator.
    pub fn new() -> Result<Token, getrandom::Error> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw)?;
        let mut hex = [0u8; 32];
        for (i, b) in raw.iter().enumerate() {
            hex[2 * i] = HEX[(b >> 4) as usize];
            hex[2 * i + 1] = HEX[(b & 0xF) as usize];
        }
        Ok(Token(hex))
    }

    /// The bytes stored in Redis.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a capability: print only a prefix.
        write!(f, "Token({}…)", String::from_utf8_lossy(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_hex() {
        let a = Token::new().unwrap();
        let b = Token::new().unwrap();
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.as_bytes().len(), 32);
    }
}
