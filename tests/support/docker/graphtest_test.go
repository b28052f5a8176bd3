// Docker's graph-driver conformance functions (daemon/graphdriver/graphtest)
// run against a legacy graph-driver plugin through Docker's own plugin
// proxy, or against Docker's own devicemapper driver.  graphtest asks
// graphdriver.GetDriver for a driver by name with no plugin getter and
// without experimental mode, so a built-in name is registered here whose
// init asks for the plugin the way dockerd does.
//
// The plugin's name comes from LIBDM_GRAPHTEST_PLUGIN (default "libdm"):
// a socket at /run/docker/plugins/<name>.sock.  LIBDM_GRAPHTEST_DRIVER
// names another driver instead ("devicemapper", compiled in below), and
// LIBDM_GRAPHTEST_OPTIONS gives the driver's options, comma-separated
// (dm.thinpooldev=/dev/mapper/POOL,...).
package libdmgraphtest

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/daemon/graphdriver"
	_ "github.com/docker/docker/daemon/graphdriver/devmapper" // the other column
	"github.com/docker/docker/daemon/graphdriver/graphtest"
	"github.com/docker/docker/pkg/idtools"
	"github.com/docker/docker/pkg/plugingetter"
	"github.com/docker/docker/pkg/plugins"
	"github.com/docker/docker/pkg/reexec"
)

const proxyName = "libdm-through-proxy"

// legacyPlugins resolves v1 plugins as dockerd's plugin store does for them.
type legacyPlugins struct{}

func (legacyPlugins) Get(name, capability string, mode int) (plugingetter.CompatPlugin, error) {
	return plugins.Get(name, capability)
}

func (legacyPlugins) GetAllByCap(capability string) ([]plugingetter.CompatPlugin, error) {
	found, err := plugins.GetAll(capability)
	if err != nil {
		return nil, err
	}
	out := make([]plugingetter.CompatPlugin, 0, len(found))
	for _, p := range found {
		out = append(out, p)
	}
	return out, nil
}

func (legacyPlugins) GetAllManagedPluginsByCap(capability string) []plugingetter.CompatPlugin {
	return nil
}

func (legacyPlugins) Handle(capability string, callback func(string, *plugins.Client)) {
	plugins.Handle(capability, callback)
}

func pluginName() string {
	if name := os.Getenv("LIBDM_GRAPHTEST_PLUGIN"); name != "" {
		return name
	}
	return "libdm"
}

func init() {
	reexec.Init()
	if err := graphdriver.Register(proxyName, func(home string, options []string, uidMaps, gidMaps []idtools.IDMap) (graphdriver.Driver, error) {
		return graphdriver.GetDriver(pluginName(), legacyPlugins{}, graphdriver.Options{
			Root:                home,
			DriverOptions:       options,
			UIDMaps:             uidMaps,
			GIDMaps:             gidMaps,
			ExperimentalEnabled: true,
		})
	}); err != nil {
		panic(err)
	}
}

// The driver under test: the plugin through the proxy, or the one named.
func driverName() string {
	if name := os.Getenv("LIBDM_GRAPHTEST_DRIVER"); name != "" {
		return name
	}
	return proxyName
}

func driverOptions() []string {
	if opts := os.Getenv("LIBDM_GRAPHTEST_OPTIONS"); opts != "" {
		return strings.Split(opts, ",")
	}
	return nil
}

// The functions share one driver, as Docker's own driver tests do:
// Setup first (with the options), Teardown last (go test runs them in
// this order).

func TestSetup(t *testing.T) {
	graphtest.GetDriver(t, driverName(), driverOptions()...)
}

func TestCreateEmpty(t *testing.T) {
	graphtest.DriverTestCreateEmpty(t, driverName())
}

func TestCreateBase(t *testing.T) {
	graphtest.DriverTestCreateBase(t, driverName())
}

func TestCreateSnap(t *testing.T) {
	graphtest.DriverTestCreateSnap(t, driverName())
}

func TestDeepLayerRead50(t *testing.T) {
	graphtest.DriverTestDeepLayerRead(t, 50, driverName())
}

func TestDiffApply10Files(t *testing.T) {
	graphtest.DriverTestDiffApply(t, 10, driverName())
}

func TestChanges(t *testing.T) {
	graphtest.DriverTestChanges(t, driverName())
}

func TestTeardown(t *testing.T) {
	graphtest.PutDriver(t)
}

// TestTimeCalls times each graph-driver call a layer and a container take,
// for several drivers taking turns round by round (bench/docker.py reads
// its last line).  It runs only when LIBDM_GRAPHTEST_TIMING gives the
// number of rounds; LIBDM_GRAPHTEST_TIMING_DRIVERS lists the drivers as
// NAME|OPTION,OPTION;... ("proxy" is the plugin through Docker's proxy).
func TestTimeCalls(t *testing.T) {
	rounds, _ := strconv.Atoi(os.Getenv("LIBDM_GRAPHTEST_TIMING"))
	if rounds <= 0 {
		t.Skip("LIBDM_GRAPHTEST_TIMING is not set")
	}
	type timedDriver struct {
		name   string
		driver graphdriver.Driver
		parent string
		layers []string
	}
	var drivers []*timedDriver
	for _, spec := range strings.Split(os.Getenv("LIBDM_GRAPHTEST_TIMING_DRIVERS"), ";") {
		name, opts, _ := strings.Cut(spec, "|")
		registered := name
		if name == "proxy" {
			registered = proxyName
		}
		var options []string
		if opts != "" {
			options = strings.Split(opts, ",")
		}
		d, err := graphdriver.GetDriver(registered, nil, graphdriver.Options{Root: t.TempDir(), DriverOptions: options})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer d.Cleanup()
		drivers = append(drivers, &timedDriver{name: name, driver: d})
	}
	layer := layerTar(t, 2<<20)
	times := map[string]map[string][]float64{}
	for _, td := range drivers {
		times[td.name] = map[string][]float64{}
	}
	for i := 0; i < rounds; i++ {
		for _, td := range drivers {
			d, parent := td.driver, td.parent
			timed := func(call string, f func() error) {
				start := time.Now()
				if err := f(); err != nil {
					t.Fatalf("%s %s: %v", td.name, call, err)
				}
				times[td.name][call] = append(times[td.name][call], time.Since(start).Seconds())
			}
			id := fmt.Sprintf("timing-%d-%d", time.Now().UnixNano(), i)
			rw := id + "-rw"
			timed("Create", func() error { return d.Create(id, parent, nil) })
			timed("ApplyDiff", func() error {
				_, err := d.ApplyDiff(id, parent, bytes.NewReader(layer))
				return err
			})
			timed("CreateReadWrite", func() error { return d.CreateReadWrite(rw, id, nil) })
			timed("Get", func() error {
				_, err := d.Get(rw, "")
				return err
			})
			timed("Put", func() error { return d.Put(rw) })
			timed("Remove", func() error { return d.Remove(rw) })
			td.layers = append(td.layers, id)
			td.parent = id
		}
	}
	for _, td := range drivers {
		for i := len(td.layers) - 1; i >= 0; i-- {
			if err := td.driver.Remove(td.layers[i]); err != nil {
				t.Fatal(err)
			}
		}
	}
	out, err := json.Marshal(times)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("LIBDM_TIMING %s\n", out)
}

// layerTar is a layer of one file of size bytes (random, so that nothing
// on the way can compress or share it).
func layerTar(t *testing.T, size int) []byte {
	data := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(data)
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	hdr := &tar.Header{Name: "blob", Mode: 0o644, Size: int64(size), ModTime: time.Unix(1700000000, 0)}
	if err := w.WriteHeader(hdr); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
