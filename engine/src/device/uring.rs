//! Placeholder: filled by the io_uring backend work (engine issue).
