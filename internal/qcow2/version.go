package qcow2

import (
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// settle is how long a qemu-img binary must have been left unchanged
// before its version is remembered: file times are kept in coarse ticks,
// so a binary rewritten in place within one tick, to the same size, could
// otherwise look like the one whose version was stored.
const settle = 2 * time.Second

// versionEntry is what the version cache holds: the version qemu-img
// printed, and the identity of the binary that printed it.
type versionEntry struct {
	Path    string `json:"path"`
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Size    int64  `json:"size"`
	MTime   int64  `json:"mtime_ns"`
	CTime   int64  `json:"ctime_ns"`
	Version string `json:"version"`
}

// VersionCached is Version, remembered in cacheFile: a run whose qemu-img
// is the very binary of the stored entry (same path, device, inode, size,
// modification and change times) reads its version there instead of
// starting the process (about 20–40 ms of every run, more with a cold
// page cache). Any change of the binary (an upgrade, a rewrite, another
// binary under the name) misses the entry and runs it again. An empty
// cacheFile, or one that cannot be read or written, only costs the run.
func VersionCached(path, cacheFile string) (string, error) {
	return versionCached(path, cacheFile, time.Now())
}

func versionCached(path, cacheFile string, now time.Time) (string, error) {
	id, idErr := binaryID(path)
	if cacheFile != "" && idErr == nil {
		var e versionEntry
		if b, err := os.ReadFile(cacheFile); err == nil && json.Unmarshal(b, &e) == nil {
			v := e.Version
			e.Version = ""
			if e == id && v != "" {
				return v, nil
			}
		}
	}
	v, err := Version(path)
	if err != nil || cacheFile == "" || idErr != nil || now.Sub(time.Unix(0, id.CTime)) < settle {
		return v, err
	}
	id.Version = v
	storeEntry(cacheFile, id)
	return v, nil
}

// binaryID is the identity of the file path names (symbolic links
// followed), with its resolved path.
func binaryID(path string) (versionEntry, error) {
	real, err := filepath.EvalSymlinks(path)
	if err == nil {
		real, err = filepath.Abs(real)
	}
	if err != nil {
		return versionEntry{}, err
	}
	var st syscall.Stat_t
	if err := syscall.Stat(real, &st); err != nil {
		return versionEntry{}, err
	}
	return versionEntry{
		Path: real, Dev: uint64(st.Dev), Ino: st.Ino, Size: st.Size,
		MTime: st.Mtim.Nano(), CTime: st.Ctim.Nano(),
	}, nil
}

// storeEntry writes the cache file whole (temporary file, rename), so a
// concurrent run reads the old entry or the new one, never half of it. No
// fsync: a cache lost in a crash is only read again.
func storeEntry(cacheFile string, e versionEntry) {
	b, err := json.Marshal(e)
	if err != nil {
		return
	}
	dir := filepath.Dir(cacheFile)
	if os.MkdirAll(dir, 0o755) != nil {
		return
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(cacheFile)+".tmp-*")
	if err != nil {
		return
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), cacheFile)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
}
