//! sluice-lockproto: see docs/ARCHITECTURE.md. Filled by its issue.
