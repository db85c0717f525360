use crate::k8s::*;
use crate::policy::*;
use crate::*;

fn one(doc: &str) -> Resource {
    let mut rs = parse_documents(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
    assert_eq!(rs.len(), 1);
    rs.pop().unwrap()
}

fn refused(doc: &str) -> ResourceError {
    parse_documents(doc).expect_err(doc)
}

/// Parses, prints and parses again: the stored form reads back to the same object.
fn round_trips(r: &Resource) {
    let again = one(&serde_json::to_string(&r.to_value()).unwrap());
    assert_eq!(&again, r);
}

/// The example of Kubernetes' documentation ("Network Policies"), unchanged.
const K8S_EXAMPLE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
"#;

#[test]
fn kubernetes_example_applies_unchanged() {
    let r = one(K8S_EXAMPLE);
    assert_eq!(r.kind(), Kind::KubernetesNetworkPolicy);
    assert_eq!(
        r.key(),
        "/trellis/v1/kubernetesnetworkpolicies/default/test-network-policy"
    );
    assert_eq!(r.to_value()["apiVersion"], "networking.k8s.io/v1");
    round_trips(&r);
    let Resource::KubernetesNetworkPolicy(p) = r else {
        panic!()
    };
    assert_eq!(p.spec.ingress[0].from.len(), 3);
    assert_eq!(
        p.spec.pod_selector.to_selector(),
        Selector::parse("role == 'db'").unwrap()
    );
}

fn knp(spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}")
}

fn knp_spec(spec: &str) -> KubernetesNetworkPolicySpec {
    match one(&knp(spec)) {
        Resource::KubernetesNetworkPolicy(p) => p.spec,
        other => panic!("{other:?}"),
    }
}

#[test]
fn kubernetes_defaulting_as_the_api_server_does() {
    use PolicyType::*;
    // No policyTypes, no egress: Ingress only (even with no ingress rules either).
    assert_eq!(knp_spec("  podSelector: {}\n").policy_types, [Ingress]);
    // Egress rules: Ingress and Egress.
    let s = knp_spec("  podSelector: {}\n  egress:\n  - ports: [{port: 53, protocol: UDP}]\n");
    assert_eq!(s.policy_types, [Ingress, Egress]);
    // An empty egress list is no egress rule.
    assert_eq!(
        knp_spec("  podSelector: {}\n  egress: []\n").policy_types,
        [Ingress]
    );
    // Given types are kept.
    assert_eq!(
        knp_spec("  podSelector: {}\n  policyTypes: [Egress]\n").policy_types,
        [Egress]
    );
    // A port's protocol defaults to TCP.
    let s = knp_spec(
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}, {port: http, protocol: UDP}]\n",
    );
    assert_eq!(s.ingress[0].ports[0].protocol, Some(KubeProtocol::Tcp));
    assert_eq!(s.ingress[0].ports[1].protocol, Some(KubeProtocol::Udp));
    // Without a namespace, `default`.
    let r = one("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}\n");
    assert_eq!(r.metadata().namespace.as_deref(), Some("default"));
}

#[test]
fn label_selectors_become_calico_selectors() {
    let s = knp_spec(
        "  podSelector:\n    matchLabels: {app: web}\n    matchExpressions:\n    - {key: tier, operator: In, values: [a, b]}\n    - {key: env, operator: NotIn, values: [dev]}\n    - {key: x, operator: Exists}\n    - {key: y, operator: DoesNotExist}\n",
    );
    assert_eq!(
        s.pod_selector.to_selector().to_string(),
        "app == 'web' && tier in {'a', 'b'} && env not in {'dev'} && has(x) && !has(y)"
    );
    assert_eq!(LabelSelector::default().to_selector(), Selector::All);
}

#[test]
fn bad_kubernetes_policies_name_the_field() {
    let cases = [
        ("  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n", "spec.ingress[0].from[0]", "not both"),
        ("  podSelector: {}\n  ingress:\n  - from: [{}]\n", "spec.ingress[0].from[0]", "must give"),
        ("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]\n", "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
        ("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]\n", "spec.egress[0].to[0].ipBlock.except[0]", "strict subset"),
        ("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/33}}]\n", "spec.egress[0].to[0].ipBlock.cidr", "not a CIDR"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: 90, endPort: 80}]\n", "spec.ingress[0].ports[0].endPort", "between"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 80}]\n", "spec.ingress[0].ports[0].endPort", "named"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{endPort: 80}]\n", "spec.ingress[0].ports[0].endPort", "needs a port"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n", "spec.ingress[0].ports[0].port", "1-65535"),
        ("  podSelector: {}\n  ingress:\n  - ports: [{port: Web_Port}]\n", "spec.ingress[0].ports[0].port", "port name"),
        ("  podSelector:\n    matchExpressions: [{key: a, operator: In}]\n", "spec.podSelector.matchExpressions[0].values", "non-empty"),
        ("  podSelector:\n    matchExpressions: [{key: a, operator: Exists, values: [x]}]\n", "spec.podSelector.matchExpressions[0].values", "empty"),
        ("  podSelector:\n    matchLabels: {'a b': c}\n", "spec.podSelector.matchLabels", "label key"),
        ("  podSelector: {}\n  policyTypes: [Ingress, Ingress]\n", "spec.policyTypes", "twice"),
    ];
    for (spec, field, why) in cases {
        let e = refused(&knp(spec));
        assert_eq!(e.field, field, "{spec}: {e}");
        assert!(e.reason.contains(why), "{spec}: {e}");
    }
    // Unknown fields and values serde refuses, by path.
    let e = refused(&knp("  podSelector: {}\n  ingres: []\n"));
    assert!(e.reason.contains("ingres"), "{e}");
    let e = refused(&knp(
        "  podSelector: {}\n  ingress:\n  - ports: [{protocol: ICMP}]\n",
    ));
    assert!(e.field.contains("protocol"), "{e}");
    let e = refused(&knp("  ingress: []\n"));
    assert!(e.reason.contains("podSelector"), "{e}");
}

const CALICO_POLICY: &str = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: allow-tcp-6379
  namespace: production
spec:
  tier: security
  order: 10
  selector: role == 'database'
  serviceAccountSelector: "role == 'db'"
  ingress:
  - action: Log
    protocol: TCP
  - action: Allow
    protocol: TCP
    source:
      selector: role == 'frontend'
      namespaceSelector: has(ns)
      notNets: [10.1.0.0/16]
      serviceAccounts:
        names: [api]
        selector: team == 'a'
    destination:
      ports: [6379, "7000:7010", redis]
      notPorts: [7005]
  - action: Pass
    protocol: icmp
    icmp: {type: 8, code: 0}
    notICMP: {type: 13}
  - action: Deny
    notProtocol: 17
    ipVersion: 4
    destination:
      nets: [10.0.0.1]
      notSelector: has(x)
  egress:
  - action: Allow
    destination:
      ports: [dns]
"#;

#[test]
fn calico_policy_applies_unchanged() {
    let r = one(CALICO_POLICY);
    assert_eq!(r.kind(), Kind::NetworkPolicy);
    assert_eq!(
        r.key(),
        "/trellis/v1/networkpolicies/production/allow-tcp-6379"
    );
    round_trips(&r);
    let Resource::NetworkPolicy(p) = &r else {
        panic!()
    };
    // Both directions have rules, so both types.
    assert_eq!(p.spec.types, [PolicyType::Ingress, PolicyType::Egress]);
    let rule = &p.spec.ingress[1];
    assert_eq!(
        rule.destination.ports,
        [
            PortSpec::Range {
                first: 6379,
                last: 6379
            },
            PortSpec::Range {
                first: 7000,
                last: 7010
            },
            PortSpec::Named("redis".into())
        ]
    );
    // The protocol's name is canonical whatever the case it was given in.
    assert_eq!(p.spec.ingress[2].protocol, Some(RuleProtocol::Icmp));
    assert_eq!(r.to_value()["spec"]["ingress"][2]["protocol"], "ICMP");
    assert_eq!(r.to_value()["spec"]["ingress"][3]["notProtocol"], 17);
    // trellis.dev/v1 is accepted too.
    let t = CALICO_POLICY.replace("projectcalico.org/v3", "trellis.dev/v1");
    assert_eq!(one(&t), r);
}

#[test]
fn calico_defaults() {
    let r = one("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec:\n  egress: [{action: Deny}]\n");
    let Resource::GlobalNetworkPolicy(g) = &r else {
        panic!()
    };
    assert_eq!(g.spec.types, [PolicyType::Egress]);
    assert_eq!(g.spec.tier.as_deref(), Some("default"));
    let r = one("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\n");
    let Resource::Tier(t) = &r else { panic!() };
    assert_eq!(t.spec.default_action, Some(TierAction::Deny));
    assert_eq!(t.spec.order, None);
    let r = one("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\n");
    let Resource::Tier(t) = &r else { panic!() };
    assert_eq!(t.spec.order, Some(DEFAULT_TIER_ORDER));
}

fn np(spec: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}")
}

#[test]
fn bad_calico_policies_name_the_field() {
    let cases = [
        // A malformed selector: the position is in the message.
        ("  selector: app == 'a' &&\n", "spec.selector", "offset 13"),
        ("  selector: \"app = 'a'\"\n", "spec.selector", "offset 4"),
        ("  ingress:\n  - action: Allow\n    source: {selector: \"a in {'x'\"}\n", "spec.ingress[0].source.selector", "offset"),
        ("  selector: global()\n", "spec.selector", "global()"),
        ("  ingress:\n  - action: Allow\n    source: {namespaceSelector: global() || has(a)}\n", "spec.ingress[0].source.namespaceSelector", "whole"),
        // Ports and ICMP in one rule.
        ("  ingress:\n  - action: Allow\n    protocol: ICMP\n    icmp: {type: 8}\n    destination: {ports: [80]}\n", "spec.ingress[0].icmp", "both ports and ICMP"),
        ("  ingress:\n  - action: Allow\n    protocol: TCP\n    icmp: {type: 8}\n", "spec.ingress[0].icmp", "ICMP or ICMPv6"),
        ("  ingress:\n  - action: Allow\n    icmp: {type: 8}\n", "spec.ingress[0].icmp", "ICMP or ICMPv6"),
        ("  ingress:\n  - action: Allow\n    protocol: ICMP\n    icmp: {code: 1}\n", "spec.ingress[0].icmp.code", "needs a type"),
        ("  ingress:\n  - action: Allow\n    protocol: ICMP\n    destination: {ports: [http]}\n", "spec.ingress[0].destination.ports", "has no ports"),
        ("  ingress:\n  - action: Allow\n    destination: {ports: [80]}\n", "spec.ingress[0].destination.ports", "need a protocol"),
        ("  ingress:\n  - action: Allow\n    protocol: ICMPv6\n    ipVersion: 4\n", "spec.ingress[0].protocol", "ipVersion 6"),
        ("  ingress:\n  - action: Allow\n    ipVersion: 6\n    source: {nets: [10.0.0.0/8]}\n", "spec.ingress[0].source.nets", "ipVersion 6"),
        ("  ingress:\n  - action: Allow\n    source: {nets: [10.0.0.0/8]}\n    destination: {nets: ['fd00::/64']}\n", "spec.ingress[0].destination.nets", "IPv4 or all IPv6"),
        ("  ingress:\n  - action: Allow\n    source: {notNets: [0.0.0.0/0]}\n", "spec.ingress[0].source.notNets", "matches no traffic"),
        ("  ingress:\n  - action: Allow\n    source: {nets: [10.0.0.0/40]}\n", "spec.ingress[0].source.nets[0]", "not a CIDR"),
        ("  ingress:\n  - action: Allow\n    http: {methods: [GET]}\n", "spec.ingress[0].http", "L7"),
        ("  ingress:\n  - action: Allow\n    destination: {services: {name: s}}\n", "spec.ingress[0].destination.services", "not supported"),
        ("  tier: Security\n", "spec.tier", "DNS label"),
        ("  types: [Egress, Egress]\n", "spec.types", "twice"),
    ];
    for (spec, field, why) in cases {
        let e = refused(&np(spec));
        assert_eq!(e.field, field, "{spec}: {e}");
        assert!(e.reason.contains(why), "{spec}: {e}");
        assert!(e.to_string().contains("NetworkPolicy/p"), "{e}");
    }
    // serde's refusals name the path.
    for (spec, path) in [
        ("  ingress:\n  - action: Allow\n    protocol: TCPP\n", "spec.ingress[0].protocol"),
        ("  ingress:\n  - action: Alow\n", "spec.ingress[0].action"),
        ("  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {ports: [\"90:80\"]}\n", "spec.ingress[0].destination.ports[0]"),
        ("  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {ports: [70000]}\n", "spec.ingress[0].destination.ports[0]"),
        ("  ingress:\n  - action: Allow\n    protocol: 0\n", "spec.ingress[0].protocol"),
        ("  ingress:\n  - action: Allow\n    sourc: {}\n", "spec.ingress[0]"),
        ("  colour: blue\n", "spec"),
    ] {
        let e = refused(&np(spec));
        assert!(e.field.starts_with(path), "{spec}: {e}");
    }
    // Named ports may go without a protocol.
    one(&np(
        "  ingress:\n  - action: Allow\n    destination: {ports: [http]}\n",
    ));
    // A range written without quotes is a range, not YAML 1.1's base-60 number.
    let r = one(&np(
        "  ingress:\n  - action: Allow\n    protocol: UDP\n    destination:\n      ports: [1:2]\n",
    ));
    let Resource::NetworkPolicy(p) = r else {
        panic!()
    };
    assert_eq!(
        p.spec.ingress[0].destination.ports[0],
        PortSpec::Range { first: 1, last: 2 }
    );
}

#[test]
fn tiers_sets_and_profiles() {
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\nspec: {order: 5}\n");
    assert_eq!(e.field, "spec.order");
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\nspec: {defaultAction: Pass}\n");
    assert_eq!(e.field, "spec.defaultAction");
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: a.b}\n");
    assert_eq!(e.field, "metadata.name");
    let e = refused("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: t}\nspec: {defaultAction: Allow}\n");
    assert!(e.field.contains("defaultAction"), "{e}");
    one("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: t}\nspec: {order: 100, defaultAction: Pass}\n");

    let set = "apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: s, namespace: x, labels: {role: ext}}\nspec:\n  nets: [10.0.0.0/8, 192.168.1.1, 'fd00::/64']\n";
    let r = one(set);
    assert_eq!(r.key(), "/trellis/v1/networksets/x/s");
    round_trips(&r);
    let e = refused(&set.replace("10.0.0.0/8", "10.0.0.0/99"));
    assert_eq!(e.field, "spec.nets[0]");
    let e = refused(&set.replace("10.0.0.0/8", "not-a-net"));
    assert_eq!(e.field, "spec.nets[0]");
    let e = refused(&set.replace("role: ext", "projectcalico.org/namespace: y"));
    assert_eq!(e.field, "metadata.labels");
    let g = one("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: g}\nspec: {nets: [1.2.3.0/24]}\n");
    assert_eq!(g.key(), "/trellis/v1/globalnetworksets/g");

    let prof = one("apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata: {name: kns.x}\nspec:\n  labelsToApply: {team: a}\n  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n");
    round_trips(&prof);
    let e = refused("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {doNotTrack: true}\n");
    assert_eq!(e.field, "spec.doNotTrack");
}

#[test]
fn namespaces_and_service_accounts() {
    let r = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\nstatus: {phase: Active}\n");
    assert_eq!(r.key(), "/trellis/v1/namespaces/x");
    // The API server's implicit label.
    assert_eq!(r.metadata().labels[LABEL_NAMESPACE_NAME], "x");
    assert_eq!(r.to_value()["apiVersion"], "v1");
    round_trips(&r);
    let e = refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: X}\n");
    assert_eq!(e.field, "metadata.name");
    let e = refused("apiVersion: trellis.dev/v1\nkind: Namespace\nmetadata: {name: x}\n");
    assert_eq!(e.field, "apiVersion");
    let sa = one("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: api, namespace: x, labels: {team: a}}\nsecrets: [{name: t}]\n");
    assert_eq!(sa.key(), "/trellis/v1/serviceaccounts/x/api");
    round_trips(&sa);
    // A NetworkPolicy's apiVersion picks the kind; a wrong one says which are accepted.
    let e = refused("apiVersion: v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n");
    assert_eq!(e.field, "apiVersion");
    assert!(e.reason.contains("networking.k8s.io/v1"), "{e}");
}

#[test]
fn workload_endpoint_policy_fields() {
    let wep = "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: x, labels: {app: web}}\nspec:\n  node: n1\n  serviceAccountName: api\n  profiles: [kns.x]\n  ports:\n  - {name: http, protocol: TCP, port: 8080}\n  - {name: dns, protocol: UDP, port: 53}\n";
    let r = one(wep);
    round_trips(&r);
    let Resource::WorkloadEndpoint(w) = &r else {
        panic!()
    };
    assert_eq!(w.spec.ports[1].protocol, RuleProtocol::Udp);
    let e = refused(&wep.replace("protocol: UDP", "protocol: ICMP"));
    assert_eq!(e.field, "spec.ports[1].protocol");
    let e = refused(&wep.replace(
        "name: dns",
        "name: http, protocol: TCP, port: 81}\n  - {name: x",
    ));
    assert_eq!(e.field, "spec.ports[1].name");
    let e = refused(&wep.replace("app: web", "'app x': web"));
    assert_eq!(e.field, "metadata.labels");
}

#[test]
fn kinds_parse_from_cli_names() {
    assert_eq!(Kind::parse("networkpolicies"), Some(Kind::NetworkPolicy));
    assert_eq!(Kind::parse("networkpolicy"), Some(Kind::NetworkPolicy));
    assert_eq!(Kind::parse("NetworkPolicy"), Some(Kind::NetworkPolicy));
    assert_eq!(
        Kind::parse("kubernetesnetworkpolicies"),
        Some(Kind::KubernetesNetworkPolicy)
    );
    assert_eq!(Kind::parse("knp"), Some(Kind::KubernetesNetworkPolicy));
    assert_eq!(Kind::parse("gnp"), Some(Kind::GlobalNetworkPolicy));
    assert_eq!(Kind::parse("tiers"), Some(Kind::Tier));
    assert_eq!(Kind::parse("namespace"), Some(Kind::Namespace));
    assert_eq!(
        Kind::parse("globalnetworksets"),
        Some(Kind::GlobalNetworkSet)
    );
    assert_eq!(Kind::parse("profiles"), Some(Kind::Profile));
    assert_eq!(Kind::parse("serviceaccounts"), Some(Kind::ServiceAccount));
    // Every plural is a distinct key segment.
    let mut plurals: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
    plurals.sort();
    plurals.dedup();
    assert_eq!(plurals.len(), Kind::ALL.len());
}
