// CoreDNS with only the plugins the test node's cluster DNS uses, built from the pinned github.com/coredns/coredns
// module (node-up.sh generates the go.mod). Leaving out the cloud back ends (route53, azure, clouddns, …) keeps their
// SDKs out of the build.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// The plugins above, in the order CoreDNS's own build runs them (its generated directive list).
var plugins = map[string]bool{"cache": true, "errors": true, "forward": true, "health": true, "kubernetes": true,
	"loadbalance": true, "log": true, "loop": true, "ready": true, "reload": true}

func init() {
	var kept []string
	for _, d := range dnsserver.Directives {
		if plugins[d] {
			kept = append(kept, d)
		}
	}
	dnsserver.Directives = kept
}

func main() { coremain.Run() }
