//! NBD server: the fixed-newstyle handshake and the transmission phase,
//! exporting volumes, qtrees and snapshots of the engine to real block
//! clients. (Being written: issue 4.)
