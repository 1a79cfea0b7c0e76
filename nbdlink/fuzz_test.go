package nbdlink_test

import (
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/cbtfs/cbtfs/nbdlink"
)

// fuzzExportSize keeps every in-range request small, so the fuzzer hunts
// for logic bugs rather than allocations: buffers are bounded by it, and
// longer requests are refused before anything is allocated.
const fuzzExportSize = 1 << 20

func fuzzServer(t testing.TB) *nbdlink.Server {
	t.Helper()
	rw := newMemExport(fuzzExportSize, 64<<10, "b0", true)
	rw.baseWrite(pattern(1, 256<<10), 128<<10)
	mustWrite(rw, pattern(2, 4096), 512<<10)
	ro := newMemExport(fuzzExportSize, 4096, "", false)
	srv, err := nbdlink.NewServer([]nbdlink.ExportConfig{
		{Export: fastZeroExport{rw}, Description: "fuzz"},
		{Name: "ro", Export: ro, ReadOnly: true, MultiConn: true},
	}, &nbdlink.Options{HandshakeTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// feed runs one connection of srv over net.Pipe: setup (if any) speaks as
// a client first, then in is written and the client end closed, while
// replies are drained (and checked by check, if set). The server must
// finish on its own.
func feed(t *testing.T, srv *nbdlink.Server, in []byte, setup func(*rawClient) bool) {
	client, server := net.Pipe()
	defer client.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeConn(t.Context(), server)
	}()
	r := newRawClient(t, client)
	check := false
	if setup != nil {
		check = setup(r)
	}
	var wg sync.WaitGroup
	var replyErr error
	wg.Go(func() {
		if !check {
			_, _ = io.Copy(io.Discard, r.br)
			return
		}
		// Structured mode: every reply must be well formed (a READ
		// never gets a simple reply, so no data follows one).
		for {
			if _, err := r.tryReadReply(func(uint64) int { return 0 }); err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrClosedPipe) && !errors.Is(err, io.ErrUnexpectedEOF) {
					replyErr = err
				}
				_, _ = io.Copy(io.Discard, r.br)
				return
			}
		}
	})
	_, _ = client.Write(in)
	client.Close()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("server did not finish")
	}
	wg.Wait()
	if replyErr != nil {
		t.Fatalf("malformed reply: %v", replyErr)
	}
}

// Byte builders for seeds.
func optBytes(opt uint32, data []byte) []byte {
	b := be.AppendUint64(nil, ihaveopt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := be.AppendUint32(nil, requestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// someRequests is a mixed request stream used as a seed.
func someRequests() []byte {
	return cat(
		reqBytes(0, cmdRead, 1, 0, 4096, nil),
		reqBytes(flagDF, cmdRead, 2, 100, 70000, nil),
		reqBytes(flagFUA, cmdWrite, 3, 4096, 512, pattern(3, 512)),
		reqBytes(0, cmdWrite, 4, fuzzExportSize-10, 20, pattern(4, 20)),
		reqBytes(0, cmdFlush, 5, 0, 0, nil),
		reqBytes(0, cmdTrim, 6, 0, 65536, nil),
		reqBytes(flagNoHole|flagFastZero, cmdWriteZeroes, 7, 65536, 65536, nil),
		reqBytes(0, cmdCache, 8, 0, 4096, nil),
		reqBytes(flagReqOne, cmdBlockStatus, 9, 100, 1000, nil),
		reqBytes(0, cmdBlockStatus, 10, 0, fuzzExportSize, nil),
		reqBytes(0, 42, 11, 0, 0, nil),
		reqBytes(0, cmdRead, 12, 1<<64-512, 1024, nil),
		reqBytes(0, cmdRead, 13, 0, 0, nil),
		reqBytes(0, cmdDisc, 14, 0, 0, nil),
	)
}

func FuzzNegotiate(f *testing.F) {
	f.Add(cat(
		be.AppendUint32(nil, 3),
		optBytes(optStructured, nil),
		optBytes(optList, nil),
		optBytes(optInfo, infoData("", 3, 1, 2)),
		optBytes(optListMeta, metaData("")),
		optBytes(optSetMeta, metaData("", "base:allocation", "qemu:", "qemu:dirty-bitmap:b0")),
		optBytes(optGo, infoData("")),
		someRequests(),
	))
	f.Add(cat(be.AppendUint32(nil, 1), optBytes(optExportName, []byte("ro")), someRequests()))
	f.Add(cat(be.AppendUint32(nil, 3), optBytes(99, []byte{1, 2, 3}), optBytes(optStartTLS, nil),
		optBytes(optSetMeta, metaData("ro", "base:")), optBytes(optAbort, nil)))
	f.Add(cat(be.AppendUint32(nil, 3), optBytes(optStructured, nil),
		optBytes(optSetMeta, metaData("", "qemu:allocation-depth")), optBytes(optGo, infoData("ro"))))
	f.Add(be.AppendUint32(nil, 4))
	f.Fuzz(func(t *testing.T, in []byte) {
		feed(t, fuzzServer(t), in, nil)
	})
}

// FuzzRequest negotiates properly, then feeds the input as transmission
// bytes. mode selects structured replies (bit 0), the read-only export
// (bit 1) and whether all contexts are selected (bit 2).
func FuzzRequest(f *testing.F) {
	for _, mode := range []byte{0, 1, 2, 3, 5, 7} {
		f.Add(mode, someRequests())
	}
	f.Add(byte(5), reqBytes(0, cmdWrite, 1, 0, 40<<20, nil))
	f.Add(byte(5), cat(reqBytes(0, cmdBlockStatus, 1, 0, 1, nil), []byte{0x25, 0x60}))
	f.Fuzz(func(t *testing.T, mode byte, in []byte) {
		structured := mode&1 != 0
		export := ""
		if mode&2 != 0 {
			export = "ro"
		}
		var queries []string
		if structured && mode&4 != 0 {
			queries = []string{"base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"}
		}
		feed(t, fuzzServer(t), in, func(r *rawClient) bool {
			r.handshake(export, structured, queries...)
			return structured
		})
	})
}
