package fsnode

import "github.com/hanwen/go-fuse/v2/fuse"

// readData returns b as the reply to a read, like [fuse.ReadResultData],
// but as a type that also has go-fuse's Slices method: go-fuse then writes
// the reply to the kernel with one writev. For any other in-memory result
// go-fuse v2.12 first tries to splice it, writing the reply header into a
// pipe only to find it has no file to splice from and to drain the pipe
// again: three wasted system calls on every read, a fifth of the cost of a
// 64 KiB read of the dirty view.
func readData(b []byte) fuse.ReadResult { return sliceResult{b} }

// sliceResult is a read reply held in memory.
type sliceResult struct{ b []byte }

// sliceWriter is the method set go-fuse looks for (its withSlice) to write
// a reply with writev; sliceResult must keep it.
type sliceWriter interface {
	fuse.ReadResult
	Slices() ([][]byte, fuse.Status)
}

var _ sliceWriter = sliceResult{}

func (r sliceResult) Size() int                              { return len(r.b) }
func (r sliceResult) Done()                                  {}
func (r sliceResult) Bytes(buf []byte) ([]byte, fuse.Status) { return r.b, fuse.OK }
func (r sliceResult) Slices() ([][]byte, fuse.Status)        { return [][]byte{r.b}, fuse.OK }
