//! Who may do what on a node: the authorization table, as one pure function.
//!
//! The identity that counts is the verified certificate's (cluster, role), compared with
//! the node's own cluster. Trust alone grants little: a foreign cluster's CA is trusted so
//! that its observers can mirror, and that is all its certificates may do.
//!
//! | identity | mirror protocol | reads | writes | admin |
//! | --- | --- | --- | --- | --- |
//! | own cluster, `client` | no | yes | yes, on a source | yes |
//! | own cluster, other role | `observer` only | yes | no (`READ_ONLY`) | no |
//! | other trusted cluster, `observer` | yes | no | no | no |
//! | other trusted cluster, other role | no | no | no | no |
//!
//! Ending a source's epoch (a fence, however it arrives over the mirror protocol) is a
//! column of its own, [`authorize_successor`]: by default the source's own cluster's
//! observers may, and once its operator names successors (`--successor`), only those.

use crate::message::MessageType;
use crate::{ErrorCode, Name, PeerIdentity, Role};

/// What kind of node is deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A source: it takes writes and serves mirrors.
    Source,
    /// A mirror: read-only, it serves no mirrors.
    Mirror,
}

/// The classes of request the table distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Mirroring the node (the mirror protocol's hello).
    Mirror,
    /// `get`, `status`, `digest`.
    Read,
    /// `put`, `delete`.
    Write,
    /// `slots`, `slots drop`, `fence`, `promote`.
    Admin,
    /// Fencing a source as its successor, over the mirror protocol: a promoting mirror's
    /// `FenceRequest`, or a hello from a later epoch of its database.
    Succeed,
}

impl Operation {
    /// The class of a client-protocol request; `None` for a message that is not one.
    pub fn of(message_type: MessageType) -> Option<Operation> {
        match message_type {
            MessageType::GetRequest
            | MessageType::ScanRequest
            | MessageType::StatusRequest
            | MessageType::DigestRequest => Some(Operation::Read),
            MessageType::PutRequest | MessageType::DeleteRequest | MessageType::BatchRequest => {
                Some(Operation::Write)
            }
            MessageType::SlotsRequest
            | MessageType::DropSlotRequest
            | MessageType::FenceRequest
            | MessageType::PromoteRequest => Some(Operation::Admin),
            // The mirror protocol's messages, which only an admitted mirror sends.
            MessageType::Hello | MessageType::RewindRequest => Some(Operation::Mirror),
            _ => None,
        }
    }

    /// How the operation is named in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Mirror => "mirror",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Admin => "administer",
            Operation::Succeed => "fence",
        }
    }
}

/// A refusal: the code the peer gets, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{peer} may not {} this {}: {why}", operation.as_str(), match node { NodeKind::Source => "source", NodeKind::Mirror => "mirror" })]
pub struct Denied {
    /// `NOT_AUTHORIZED`, `READ_ONLY` or `OBSERVER_ONLY`.
    pub code: ErrorCode,
    /// Who asked.
    pub peer: PeerIdentity,
    /// What they asked for.
    pub operation: Operation,
    /// What kind of node refused.
    pub node: NodeKind,
    /// The rule that refused it.
    pub why: &'static str,
}

/// Whether `peer` may perform `operation` on a `node` of cluster `cluster`.
pub fn authorize(
    node: NodeKind,
    cluster: &Name,
    peer: &PeerIdentity,
    operation: Operation,
) -> Result<(), Denied> {
    let own = peer.cluster_id == *cluster;
    let refusal = match operation {
        Operation::Mirror if node == NodeKind::Mirror => Some((
            ErrorCode::NotAuthorized,
            "a mirror serves no mirrors; dial the source",
        )),
        Operation::Mirror if peer.role != Role::Observer => Some((
            ErrorCode::ObserverOnly,
            "only observer certificates may mirror",
        )),
        Operation::Mirror => None,
        _ if !own => Some((
            ErrorCode::NotAuthorized,
            "another cluster's certificates may only mirror",
        )),
        Operation::Read => None,
        Operation::Write if node == NodeKind::Mirror => Some((
            ErrorCode::ReadOnly,
            "a mirror is read-only; write to its source",
        )),
        Operation::Write if peer.role != Role::Client => {
            Some((ErrorCode::ReadOnly, "only client certificates may write"))
        }
        Operation::Write => None,
        Operation::Admin if peer.role != Role::Client => Some((
            ErrorCode::NotAuthorized,
            "only the node's own cluster's client certificates may administer it",
        )),
        Operation::Admin => None,
        Operation::Succeed => Some((
            ErrorCode::NotAuthorized,
            "who may fence a source is the successor rule's (authorize_successor)",
        )),
    };
    denied_if(refusal, node, peer, operation)
}

/// The identities that may end a source's epoch: fence it, over the mirror protocol, to
/// promote themselves in its place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Successors {
    /// The observers of the source's own cluster, whose CA is the operator's own.
    #[default]
    OwnCluster,
    /// Exactly these, each written as a SPIFFE ID: an observer matches an entry of its
    /// cluster and name, whether the entry says `observer` (the certificate it mirrors
    /// with) or `source` (the one it will serve with once promoted, of the same name).
    Listed(Vec<PeerIdentity>),
}

/// Whether `peer`, an admitted mirror, may fence the source of cluster `cluster`.
pub fn authorize_successor(
    cluster: &Name,
    successors: &Successors,
    peer: &PeerIdentity,
) -> Result<(), Denied> {
    let allowed = peer.role == Role::Observer
        && match successors {
            Successors::OwnCluster => peer.cluster_id == *cluster,
            Successors::Listed(listed) => listed.iter().any(|successor| {
                matches!(successor.role, Role::Observer | Role::Source)
                    && successor.cluster_id == peer.cluster_id
                    && successor.name == peer.name
            }),
        };
    let refusal = (!allowed).then_some((
        ErrorCode::NotAuthorized,
        match successors {
            Successors::OwnCluster => {
                "only the source's own cluster's observers may succeed it unless its operator names successors (--successor)"
            }
            Successors::Listed(_) => "only the successors the source's operator named (--successor) may fence it",
        },
    ));
    denied_if(refusal, NodeKind::Source, peer, Operation::Succeed)
}

fn denied_if(
    refusal: Option<(ErrorCode, &'static str)>,
    node: NodeKind,
    peer: &PeerIdentity,
    operation: Operation,
) -> Result<(), Denied> {
    match refusal {
        None => Ok(()),
        Some((code, why)) => Err(Denied {
            code,
            peer: peer.clone(),
            operation,
            node,
            why,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            cluster_id: Name::new(cluster).unwrap(),
            role,
            name: Name::new("n1").unwrap(),
        }
    }

    /// The table, row by row: for each node kind, identity and operation, the code a peer
    /// gets (`None`: allowed).
    #[test]
    fn the_authorization_table() {
        use ErrorCode::{NotAuthorized as NA, ObserverOnly as OO, ReadOnly as RO};
        use NodeKind::{Mirror as M, Source as S};
        use Operation::{Admin, Mirror, Read, Write};
        use Role::{Client, Observer, Source as SourceRole, Voter};
        let own = "east";
        let foreign = "west";
        #[rustfmt::skip]
        let table: &[(NodeKind, &str, Role, [Option<ErrorCode>; 4])] = &[
            // node, cluster, role,   [mirror,    read,     write,    admin]
            (S, own,     Client,     [Some(OO), None,     None,     None]),
            (S, own,     Observer,   [None,     None,     Some(RO), Some(NA)]),
            (S, own,     Voter,      [Some(OO), None,     Some(RO), Some(NA)]),
            (S, own,     SourceRole, [Some(OO), None,     Some(RO), Some(NA)]),
            (S, foreign, Client,     [Some(OO), Some(NA), Some(NA), Some(NA)]),
            (S, foreign, Observer,   [None,     Some(NA), Some(NA), Some(NA)]),
            (S, foreign, Voter,      [Some(OO), Some(NA), Some(NA), Some(NA)]),
            (S, foreign, SourceRole, [Some(OO), Some(NA), Some(NA), Some(NA)]),
            (M, own,     Client,     [Some(NA), None,     Some(RO), None]),
            (M, own,     Observer,   [Some(NA), None,     Some(RO), Some(NA)]),
            (M, own,     Voter,      [Some(NA), None,     Some(RO), Some(NA)]),
            (M, own,     SourceRole, [Some(NA), None,     Some(RO), Some(NA)]),
            (M, foreign, Client,     [Some(NA), Some(NA), Some(NA), Some(NA)]),
            (M, foreign, Observer,   [Some(NA), Some(NA), Some(NA), Some(NA)]),
            (M, foreign, Voter,      [Some(NA), Some(NA), Some(NA), Some(NA)]),
            (M, foreign, SourceRole, [Some(NA), Some(NA), Some(NA), Some(NA)]),
        ];
        let node_cluster = Name::new(own).unwrap();
        for (node, cluster, role, expected) in table {
            let peer = identity(cluster, *role);
            for (operation, code) in [Mirror, Read, Write, Admin].into_iter().zip(expected) {
                let got = authorize(*node, &node_cluster, &peer, operation).err();
                assert_eq!(
                    got.as_ref().map(|denied| denied.code),
                    *code,
                    "{node:?} {peer} {operation:?}: {got:?}"
                );
            }
        }
    }

    /// Who may fence a source, by the operator's choice of successors.
    #[test]
    fn the_successor_table() {
        use Role::{Client, Observer, Source as SourceRole, Voter};
        let named = |cluster: &str, role: Role, name: &str| PeerIdentity {
            cluster_id: Name::new(cluster).unwrap(),
            role,
            name: Name::new(name).unwrap(),
        };
        let listed = Successors::Listed(vec![
            named("west", SourceRole, "n1"),
            named("east", Observer, "n2"),
            named("north", Client, "n1"),
        ]);
        #[rustfmt::skip]
        let table: &[(&Successors, PeerIdentity, bool)] = &[
            // policy,                  peer,                                allowed
            (&Successors::OwnCluster, named("east", Observer, "n1"),   true),
            (&Successors::OwnCluster, named("east", Voter, "n1"),      false),
            (&Successors::OwnCluster, named("east", Client, "n1"),     false),
            (&Successors::OwnCluster, named("west", Observer, "n1"),   false),
            (&listed,                 named("west", Observer, "n1"),   true),
            (&listed,                 named("west", Observer, "n2"),   false),
            (&listed,                 named("east", Observer, "n2"),   true),
            (&listed,                 named("east", Observer, "n1"),   false),
            (&listed,                 named("north", Observer, "n1"),  false),
            (&listed,                 named("west", SourceRole, "n1"), false),
        ];
        let own = Name::new("east").unwrap();
        for (successors, peer, allowed) in table {
            let got = authorize_successor(&own, successors, peer);
            assert_eq!(got.is_ok(), *allowed, "{successors:?} {peer}: {got:?}");
            if let Err(denied) = got {
                assert_eq!(denied.code, ErrorCode::NotAuthorized);
                assert!(denied.to_string().contains(&peer.spiffe_uri()), "{denied}");
            }
        }
    }

    #[test]
    fn every_client_request_has_a_class() {
        for message_type in MessageType::ALL {
            let request = format!("{message_type:?}").ends_with("Request")
                && Operation::of(*message_type) != Some(Operation::Mirror);
            assert_eq!(
                Operation::of(*message_type)
                    .is_some_and(|operation| operation != Operation::Mirror),
                request,
                "{message_type:?}"
            );
        }
        assert_eq!(
            Operation::of(MessageType::BatchRequest),
            Some(Operation::Write)
        );
        assert_eq!(
            Operation::of(MessageType::ScanRequest),
            Some(Operation::Read)
        );
    }
}
