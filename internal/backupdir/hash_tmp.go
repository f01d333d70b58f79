package backupdir

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
)

// hashFile is a stand-in until the copy engine hashes while it copies.
func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
