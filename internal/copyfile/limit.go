package copyfile

import (
	"time"

	"golang.org/x/time/rate"
)

// NewLimiter returns a limiter for Options.Limit that lets bytesPerSec bytes
// through per second, measured from now: it starts empty, so that copying n
// bytes takes at least n/bytesPerSec seconds, bursts included. Its burst (the
// largest chunk copied at once) is an eighth of a second's worth, between
// 64 KiB and 16 MiB, so the copy stays smooth and checks its context often.
func NewLimiter(bytesPerSec int64) *rate.Limiter {
	burst := min(max(bytesPerSec/8, 64<<10), 16<<20)
	l := rate.NewLimiter(rate.Limit(bytesPerSec), int(burst))
	l.AllowN(time.Now(), int(burst)) // start with an empty bucket
	return l
}
