package nbdlink_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"

	"github.com/cbtfs/cbtfs/nbdlink"
)

// TestConcurrentClients runs 32 clients at once, each writing and reading
// back its own range with many requests in flight, plus flushes and block
// status queries. Replies are matched by cookie, since they may come in
// any order; run it with -race.
func TestConcurrentClients(t *testing.T) {
	const (
		clients = 32
		span    = 512 << 10 // bytes per client
		reqs    = 24        // requests in flight per round
	)
	m := newMemExport(clients*span, 64<<10, "b", true)
	sock := startServer(t, []nbdlink.ExportConfig{{Export: m, MultiConn: true}}, nil)

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := range clients {
		wg.Go(func() {
			if err := clientWork(t, sock, c, span, reqs); err != nil {
				errs <- fmt.Errorf("client %d: %w", c, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// clientWork is one client of TestConcurrentClients. Odd clients use
// simple replies, even ones structured replies with all contexts.
func clientWork(t *testing.T, sock string, c, span, reqs int) error {
	nc, err := net.Dial("unix", sock)
	if err != nil {
		return err
	}
	defer nc.Close()
	r := newRawClient(t, nc)
	structured := c%2 == 0
	var queries []string
	if structured {
		queries = []string{ctxBase, ctxDepth, "qemu:dirty-bitmap:b"}
	}
	r.handshake("", structured, queries...)

	rng := rand.New(rand.NewPCG(uint64(c), 2))
	base := uint64(c * span)
	want := make([]byte, span)
	type op struct {
		off uint64
		n   uint32
	}
	for round := range 3 {
		// Disjoint writes of random sizes covering the span, all in flight.
		var ops []op
		for off := 0; off < span; {
			n := min(span-off, 512*(1+rng.IntN(64)))
			ops = append(ops, op{uint64(off), uint32(n)})
			off += n
		}
		for i, o := range ops {
			data := pattern(byte(c*7+round+i), int(o.n))
			copy(want[o.off:], data)
			flags := uint16(0)
			if i%5 == 0 {
				flags = flagFUA
			}
			r.request(flags, cmdWrite, uint64(i), base+o.off, o.n, data)
		}
		r.request(0, cmdFlush, uint64(len(ops)), 0, 0, nil)
		if err := expectOKs(r, len(ops)+1); err != nil {
			return fmt.Errorf("round %d writes: %w", round, err)
		}
		// Reads of random pieces, reqs at a time.
		lens := map[uint64]uint32{}
		offs := map[uint64]uint64{}
		for i := range reqs {
			off := uint64(rng.IntN(span - 1))
			n := uint32(1 + rng.IntN(min(span-int(off), 256<<10)))
			cookie := uint64(1000 + i)
			lens[cookie], offs[cookie] = n, off
			r.request(0, cmdRead, cookie, base+off, n, nil)
		}
		if structured {
			r.request(0, cmdBlockStatus, 5000, base, uint32(span), nil)
		}
		pending := len(lens)
		if structured {
			pending++
		}
		for range pending {
			rep, err := r.tryReadReply(func(cookie uint64) int { return int(lens[cookie]) })
			if err != nil {
				return err
			}
			if rep.errno != 0 {
				return fmt.Errorf("cookie %d: errno %d %q", rep.cookie, rep.errno, rep.msg)
			}
			if rep.cookie == 5000 {
				if len(rep.chunks) != 3 {
					return fmt.Errorf("block status: %d chunks", len(rep.chunks))
				}
				continue
			}
			n, ok := lens[rep.cookie]
			if !ok {
				return fmt.Errorf("unexpected cookie %d", rep.cookie)
			}
			delete(lens, rep.cookie)
			data := rep.data
			if !rep.simple {
				if data, err = assembleRead(rep, base+offs[rep.cookie], n); err != nil {
					return err
				}
			}
			off := offs[rep.cookie]
			if !bytes.Equal(data, want[off:off+uint64(n)]) {
				return fmt.Errorf("round %d: read %d at %d: wrong data", round, n, off)
			}
		}
	}
	r.request(0, cmdDisc, 0, 0, 0, nil)
	return nil
}

// expectOKs reads n successful replies without data, in any order.
func expectOKs(r *rawClient, n int) error {
	seen := map[uint64]bool{}
	for range n {
		rep, err := r.tryReadReply(func(uint64) int { return 0 })
		if err != nil {
			return err
		}
		if rep.errno != 0 || seen[rep.cookie] {
			return fmt.Errorf("cookie %d: errno %d %q (seen before: %v)", rep.cookie, rep.errno, rep.msg, seen[rep.cookie])
		}
		seen[rep.cookie] = true
	}
	return nil
}

// BenchmarkRead measures READ throughput through the server from an
// in-memory export, with one request or 16 in flight.
func BenchmarkRead(b *testing.B) {
	const size = 64 << 20
	m := newMemExport(size, 64<<10, "", false)
	mustWrite(m, pattern(1, size), 0)
	sock := serveOne(b, m, true)
	for _, structured := range []bool{false, true} {
		for _, n := range []int{4 << 10, 64 << 10, 1 << 20} {
			for _, depth := range []int{1, 16} {
				name := fmt.Sprintf("structured=%v/size=%d/depth=%d", structured, n, depth)
				b.Run(name, func(b *testing.B) {
					r := dialRaw(b, sock)
					r.handshake("", structured)
					b.SetBytes(int64(n * depth))
					readLen := func(uint64) int { return n }
					var off uint64
					for b.Loop() {
						for i := range depth {
							r.request(0, cmdRead, uint64(i), off, uint32(n), nil)
							off = (off + uint64(n)) % (size - uint64(n))
						}
						for range depth {
							if rep, err := r.tryReadReply(readLen); err != nil || rep.errno != 0 {
								b.Fatalf("read: %v %d", err, rep.errno)
							}
						}
					}
				})
			}
		}
	}
}
