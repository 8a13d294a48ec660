//! Placeholder: filled by the simulated-device work (engine issue).
