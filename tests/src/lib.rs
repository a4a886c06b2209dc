//! End-to-end tests of real xmirror processes over real QUIC: not built yet (see README.md, "Status").
