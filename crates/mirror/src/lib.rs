//! The mirror node: not built yet (see README.md, "Status").
