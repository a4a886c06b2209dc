//! The source node: not built yet (see README.md, "Status").
