package copyfile

import "context"

// Unshare replaces the file at path by a copy of itself (a new inode, made
// and renamed in as Copy does), so that changing it in place afterwards
// does not change what its other hard links show: they keep the old bytes.
// The copy keeps mode, owner and times when opt.Preserve is set.
func Unshare(ctx context.Context, path string, opt Options) (Stats, error) {
	opt.unshare = true
	return Copy(ctx, path, path, opt)
}
