// Package copyfile is fi-backup's copy engine: it copies (possibly huge,
// sparse) qcow2 disk images into the backup directory with the semantics of
// the `cp -u` / `cp -up` calls in the old backup script.
//
// Two properties matter more than raw speed:
//
//   - Atomicity. The data is written to a temporary file in the destination
//     directory and renamed over the destination only after it is complete and
//     fsynced. The old script copied in place, so a copy interrupted halfway
//     (SIGKILL, power loss, full disk) left a truncated destination whose mtime
//     was newer than the source's, and the next `cp -u` run considered it up to
//     date and never repaired it. With the rename, an interrupted copy leaves
//     only a temporary file (which CleanTemps removes) and the destination is
//     either the old version or the complete new one, so NeedCopy still asks for
//     the copy on the next run.
//
//   - Holes. VM images are mostly sparse; writing their holes out as zeros
//     would multiply the space a backup takes. Like `cp --sparse=auto`, Copy
//     walks the source's data extents with SEEK_DATA/SEEK_HOLE, copies only
//     those, and sets the final size with ftruncate so trailing holes remain.
//     Where the kernel cannot copy between the two files (copy_file_range fails
//     across file systems) the read/write fallback also turns all-zero blocks
//     into holes.
//
// Copy first tries a whole-file reflink (FICLONE), which is instant and
// shares the extents on btrfs and xfs, then copy_file_range(2), then plain
// read/write with a fixed buffer, so memory use does not depend on the size
// of the image.
//
// The copy is durable when Copy returns (fsync of the file, then of the
// directory after the rename). So that this costs no more than the disk's
// own write time, the writeback is started while the data is copied, 16 MiB
// at a time, and the copy waits for the chunk before the last one: the disk
// writes while the source is read, at most two chunks are dirty, and the
// final fsync finds little left. On request (Options.Hash) Copy also
// returns the SHA-256 of the copy, read back from the page cache on another
// core: while the data is copied when nothing changes it afterwards (no
// Prepare), else after Prepare while that final fsync runs. HashFile hashes
// a file the same way.
package copyfile
