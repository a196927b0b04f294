//! Atomic installation of a complete key set into a Keystone key repository: build
//! a sibling directory, fsync it, swap it in with one `renameat2(RENAME_EXCHANGE)`
//! (or a symlink flip), so Keystone sees the old set or the new one, never a mix.
