//! Small value types shared by every message: LSNs, names, roles and versions.
//!
//! Each gets its own type so that an LSN is never mixed up with a byte count and a name
//! from the wire is validated once, when it is decoded, before anything uses it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Version 2 added batch entries in the WAL;
/// version 3 the epoch history in the ack, rewinds and promotion; version 4 compression,
/// offered in the hello and chosen in the ack. Versions 3 and 4 changed the hello and the
/// ack themselves, so a build speaks only its own: nodes are upgraded together
/// (docs/PROTOCOL.md).
pub const PROTOCOL_VERSION: u16 = 5;

/// Every protocol version this build can speak, as a mirror or as a source.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange {
    min: PROTOCOL_VERSION,
    max: PROTOCOL_VERSION,
};

/// A log sequence number: the position of one entry in the source's write-ahead log.
///
/// LSNs start at 1. `Lsn::ZERO` is the position before the first entry, which is where an
/// empty store stands; it is a real position (the chain hash at it is
/// [`ChainHash::GENESIS`](crate::ChainHash::GENESIS)), not a sentinel.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position before the first entry.
    pub const ZERO: Lsn = Lsn(0);

    /// The position right after this one.
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }

    /// The highest LSN a peer may name: 2^62 entries is no real log, and the bound keeps
    /// arithmetic on LSNs from wrapping.
    pub const LIMIT: Lsn = Lsn(1 << 62);

    /// The position `count` entries after this one.
    pub fn advance(self, count: u64) -> Lsn {
        Lsn(self.0 + count)
    }

    /// Entries from `older` (exclusive) to `self` (inclusive); zero when `older` is ahead.
    pub fn entries_since(self, older: Lsn) -> u64 {
        self.0.saturating_sub(older.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A database's identity: chosen at random when the source's store is created and never
/// changed (as PostgreSQL's system identifier). Two nodes hold the same history up to LSN n
/// exactly when they have the same database id and the same chain hash at n.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatabaseId(pub [u8; 16]);

impl DatabaseId {
    /// The id as 32 lowercase hex digits, as status shows it.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Parses 32 hex digits.
    pub fn from_hex(text: &str) -> Option<DatabaseId> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
        }
        Some(DatabaseId(bytes))
    }
}

impl fmt::Display for DatabaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DatabaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseId({})", self.to_hex())
    }
}

/// Hex in human-readable formats (status JSON), 16 bytes on the wire.
impl Serialize for DatabaseId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for DatabaseId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            DatabaseId::from_hex(&text)
                .ok_or_else(|| serde::de::Error::custom("a database id is 32 hex digits"))
        } else {
            <[u8; 16]>::deserialize(deserializer).map(DatabaseId)
        }
    }
}

/// A database's epoch: 1 when it is created, one more at each promotion (as PostgreSQL's
/// timeline). Not an LSN, so it has a type of its own.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch a database is created in.
    pub const FIRST: Epoch = Epoch(1);

    /// The highest epoch a peer may name: four billion promotions is no real history, and a
    /// bound far below `u64::MAX` keeps every `+ 1` on an epoch from wrapping.
    pub const LIMIT: Epoch = Epoch(1 << 32);

    /// The epoch after this one, if there is one below [`Epoch::LIMIT`].
    pub fn next(self) -> Option<Epoch> {
        let next = Epoch(self.0.checked_add(1)?);
        (next <= Epoch::LIMIT).then_some(next)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The random id a promotion gives the epoch it starts: two promotions never make one
/// epoch, and two histories with one epoch number and different ids are diverged. A
/// database's first epoch has id 0 (the database id already names it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EpochId(pub u64);

impl EpochId {
    /// The id of every database's first epoch.
    pub const FIRST: EpochId = EpochId(0);
}

impl fmt::Display for EpochId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a mirror does when it holds data the source cannot vouch for (`--on-divergence`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergencePolicy {
    /// Keep the data, keep serving reads of it, say why, and retry (the default: the mirror
    /// may hold the only copy of those writes).
    #[default]
    Halt,
    /// Replace the data with a fresh snapshot of the source.
    Resnapshot,
}

/// A `--on-divergence` value that is neither `halt` nor `resnapshot`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a divergence policy (halt or resnapshot)")]
pub struct UnknownPolicy(pub String);

impl FromStr for DivergencePolicy {
    type Err = UnknownPolicy;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "halt" => Ok(DivergencePolicy::Halt),
            "resnapshot" => Ok(DivergencePolicy::Resnapshot),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

/// Why a mirror holds data the source cannot vouch for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Divergence {
    /// The mirror holds another database (the source was recreated, or is another one).
    DatabaseMismatch,
    /// The mirror has applied beyond the source's last LSN: the source lost writes, or was
    /// restored from a backup.
    SourceBehind,
    /// The source's chain hash at the mirror's applied LSN differs from the mirror's.
    DivergedHistory,
    /// The mirror is behind the source's retained WAL and the source cannot show that the
    /// mirror's applied LSN is part of its history.
    Unverifiable,
}

impl Divergence {
    /// Every reason.
    pub const ALL: [Divergence; 4] = [
        Divergence::DatabaseMismatch,
        Divergence::SourceBehind,
        Divergence::DivergedHistory,
        Divergence::Unverifiable,
    ];

    /// The reason whose code is `code`, if it is one.
    pub fn from_code(code: crate::ErrorCode) -> Option<Divergence> {
        Divergence::ALL
            .into_iter()
            .find(|reason| reason.code() == code)
    }

    /// Its error code.
    pub fn code(self) -> crate::ErrorCode {
        match self {
            Divergence::DatabaseMismatch => crate::ErrorCode::DatabaseMismatch,
            Divergence::SourceBehind => crate::ErrorCode::SourceBehind,
            Divergence::DivergedHistory => crate::ErrorCode::DivergedHistory,
            Divergence::Unverifiable => crate::ErrorCode::Unverifiable,
        }
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code().name())
    }
}

/// Names a snapshot transfer on the source, so that an interrupted one can be resumed.
/// Chosen at random, so that no restart or restore of the source ever hands out an id
/// again that a mirror may still hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, as the source's clock saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

/// A name that comes from the wire or a certificate: cluster ids, node names, databases.
///
/// Names end up in file paths, store keys, SPIFFE URIs and log lines, so they are checked
/// once, here: 1 to 63 bytes of ASCII letters, digits, `-`, `_` and `.`, starting with a
/// letter or digit. Decoding a message with a bad name fails; no other code sees one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Names must not be empty.
    #[error("name is empty")]
    Empty,
    /// Names are at most [`Name::MAX_LEN`] bytes.
    #[error("name is {len} bytes long, the limit is {}", Name::MAX_LEN)]
    TooLong {
        /// The length that was offered.
        len: usize,
    },
    /// Names use a small ASCII alphabet so they are safe in paths, URIs and logs.
    #[error("name contains {found:?}: only ASCII letters, digits, '-', '_' and '.' are allowed")]
    BadCharacter {
        /// The first character that is not allowed.
        found: char,
    },
    /// Names start with a letter or digit (never `.`, so no name is a relative path).
    #[error("name starts with {found:?}: a name starts with an ASCII letter or digit")]
    BadStart {
        /// The first character.
        found: char,
    },
}

impl Name {
    /// The longest name accepted, in bytes (a DNS label's limit, so names fit in SANs).
    pub const MAX_LEN: usize = 63;

    /// Checks `value` and wraps it.
    pub fn new(value: impl Into<String>) -> Result<Name, NameError> {
        let value = value.into();
        if value.is_empty() {
            return Err(NameError::Empty);
        }
        if value.len() > Self::MAX_LEN {
            return Err(NameError::TooLong { len: value.len() });
        }
        for (index, found) in value.chars().enumerate() {
            if found.is_ascii_alphanumeric() {
                continue;
            }
            if !matches!(found, '-' | '_' | '.') {
                return Err(NameError::BadCharacter { found });
            }
            if index == 0 {
                return Err(NameError::BadStart { found });
            }
        }
        Ok(Name(value))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Name::new(value)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Name::new(value)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a certified node is allowed to be, from its SPIFFE ID `spiffe://<cluster>/<role>/<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Owns a database and its WAL; serves mirrors and clients.
    Source,
    /// A read-only mirror of a source, possibly in another cluster.
    Observer,
    /// A member of a source's own replication quorum; never served as a mirror.
    Voter,
    /// An application or operator using the client API.
    Client,
}

impl Role {
    /// Every role, in a fixed order (for tests and help texts).
    pub const ALL: [Role; 4] = [Role::Source, Role::Observer, Role::Voter, Role::Client];

    /// The role's path segment in a SPIFFE ID.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Observer => "observer",
            Role::Voter => "voter",
            Role::Client => "client",
        }
    }
}

/// A string that names no [`Role`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected one of source, observer, voter, client")]
pub struct RoleParseError(pub String);

impl FromStr for Role {
    type Err = RoleParseError;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == value)
            .ok_or_else(|| RoleParseError(value.to_owned()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who the peer is, as its verified certificate says (never as the peer itself claims).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The cluster whose CA issued the certificate (the SPIFFE trust domain).
    pub cluster_id: Name,
    /// What the certificate allows the peer to do.
    pub role: Role,
    /// The node's name within its cluster.
    pub name: Name,
}

impl PeerIdentity {
    /// The SPIFFE ID this identity is written as in a certificate.
    pub fn spiffe_uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.cluster_id, self.role, self.name)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_uri())
    }
}

/// An inclusive range of protocol versions a node can speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// The oldest version spoken.
    pub min: u16,
    /// The newest version spoken.
    pub max: u16,
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_documented_alphabet() {
        for good in ["a", "east-1", "db_0.main", "Z9", &"x".repeat(63)] {
            assert_eq!(Name::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn names_refuse_everything_else() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(
            Name::new("x".repeat(64)),
            Err(NameError::TooLong { len: 64 })
        );
        for (bad, found) in [("a/b", '/'), ("sp ace", ' '), ("é", 'é'), ("a\nb", '\n')] {
            assert_eq!(Name::new(bad), Err(NameError::BadCharacter { found }));
        }
        // '.', '-' and '_' are fine inside a name, not at its start; the error says which.
        for (bad, found) in [("../etc", '.'), ("-lead", '-'), ("_x", '_')] {
            assert_eq!(Name::new(bad), Err(NameError::BadStart { found }));
        }
        assert!(Name::new("../etc")
            .unwrap_err()
            .to_string()
            .contains("starts with '.'"));
    }

    #[test]
    fn roles_parse_from_their_own_names_only() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("admin".parse::<Role>().is_err());
        assert!("Source".parse::<Role>().is_err());
    }

    #[test]
    fn lsn_arithmetic_saturates_where_it_must() {
        assert_eq!(Lsn(5).entries_since(Lsn(2)), 3);
        assert_eq!(Lsn(2).entries_since(Lsn(5)), 0);
        assert_eq!(Lsn::ZERO.next(), Lsn(1));
    }
}
