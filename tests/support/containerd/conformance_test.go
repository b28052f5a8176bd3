// containerd's snapshotter conformance suite (snapshots/testsuite), run
// against a snapshotter served over a unix socket, the way containerd's
// proxy plugins reach one.  Built in GOPATH mode from Debian's
// golang-github-containerd-containerd-dev; see tests/test_snapshotter_conformance.py.
//
// LIBDM_SNAPSHOTTER_SOCKET names the socket.  Every test of the suite gets
// the same snapshotter: the suite must run its tests one at a time
// (-test.parallel=1), and what a test leaves behind is removed before the
// next one starts.
package conformance

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// shared keeps the connection open when a test closes its snapshotter
// (the suite's CloseTwice does).
type shared struct {
	snapshots.Snapshotter
}

func (shared) Close() error { return nil }

func removeAll(ctx context.Context, sn snapshots.Snapshotter) error {
	for round := 0; round < 200; round++ {
		var keys []string
		if err := sn.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
			keys = append(keys, info.Name)
			return nil
		}); err != nil {
			return err
		}
		if len(keys) == 0 {
			return nil
		}
		for _, k := range keys {
			// Children first: a parent refuses until its children are gone.
			if err := sn.Remove(ctx, k); err != nil && !errdefs.IsFailedPrecondition(err) && !errdefs.IsNotFound(err) {
				return err
			}
		}
	}
	return errors.New("snapshots left after 200 rounds of removal")
}

func TestConformance(t *testing.T) {
	socket := os.Getenv("LIBDM_SNAPSHOTTER_SOCKET")
	if socket == "" {
		t.Fatal("LIBDM_SNAPSHOTTER_SOCKET is not set")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, "unix://"+socket,
		grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		t.Fatalf("dial %s: %v", socket, err)
	}
	// The suite's tests are parallel subtests: they run after this function
	// returns, so the connection is closed by a cleanup, not a defer.
	t.Cleanup(func() { conn.Close() })
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "libdm")
	testsuite.SnapshotterSuite(t, "libdm", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		if err := removeAll(ctx, sn); err != nil {
			return nil, nil, err
		}
		return shared{sn}, func() error { return removeAll(ctx, sn) }, nil
	})
}
