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
	"os"
	"strings"
	"testing"

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
