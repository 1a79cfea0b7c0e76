package integration

import (
	"testing"
)

// BenchmarkRead reads a 4 GiB qcow2 image whose every cluster holds data
// with `dd bs=1M of=/dev/null`, through MNT/disk of a read-only cbtfs
// mount and through `qemu-nbd -r` + `nbdfuse -r`. Cold: a fresh mount and
// server each round, caches dropped just before each dd. Target (issue
// 2): cbtfs at least 1.5x nbdfuse's throughput.
func BenchmarkRead(b *testing.B) {
	const name = "read"
	cbtfs := benchPrepare(b, name, "qemu-img", "qemu-io", "qemu-nbd", "nbdfuse", "dd")
	const size = 4 << 30
	img := fullImage(b, size)
	mnt := benchMountDir(b)
	dd := func(file string) float64 {
		dropCaches(b)
		return mbps(size, dd(b, size, "if="+file, "of=/dev/null", "bs=1M"))
	}
	c, p := benchRounds(b, benchRoundsHeavy, func(int) float64 {
		m := mountCbtfs(b, cbtfs, img, mnt, true)
		defer m.unmount(b)
		return dd(m.disk())
	}, func(int) float64 {
		q := serveQemu(b, img, "-r")
		defer q.stop(b)
		m := mountNbdfuse(b, mnt, q.socket, true)
		defer m.unmount(b)
		return dd(m.file())
	})
	benchResult{name: name, unit: unitMBps, cbtfs: c, peer: p, atLeast: true, target: 1.5}.report(b)
}
