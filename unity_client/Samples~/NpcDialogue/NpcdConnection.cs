using Npcd;
using UnityEngine;

/// <summary>Owns the one NpcdClient of the game and polls it once per frame, before the
/// NPCs' Update (see the execution order attribute), on the main thread: every line event
/// fires here, never on a native thread.</summary>
[DefaultExecutionOrder(-100)]
public sealed class NpcdConnection : MonoBehaviour
{
    [Tooltip("host:port of the npcd daemon")]
    public string address = "127.0.0.1:50051";

    [Tooltip("the daemon's bearer token (npcd.yaml token); empty: the NPCD_TOKEN environment variable, else none")]
    public string token = "";

    [Tooltip("TLS instead of plaintext (needed for a daemon on another machine)")]
    public bool useTls = false;

    [Tooltip("TLS: PEM root certificates the daemon's certificate is checked against; empty: the system's")]
    [TextArea] public string rootCertsPem = "";

    [Tooltip("TLS: the name in the daemon's certificate when it differs from the address's host")]
    public string tlsServerName = "";

    public static NpcdConnection Instance { get; private set; }
    public NpcdClient Client { get; private set; }

    void Awake()
    {
        if (Instance != null && Instance != this)
        {
            Destroy(gameObject);
            return;
        }
        Instance = this;
        DontDestroyOnLoad(gameObject);
        string bearer = string.IsNullOrEmpty(token) ? System.Environment.GetEnvironmentVariable("NPCD_TOKEN") : token;
        Client = new NpcdClient(new NpcdClientOptions(address)
        {
            Token = string.IsNullOrEmpty(bearer) ? null : bearer,
            Tls = useTls,
            RootCertsPem = string.IsNullOrEmpty(rootCertsPem) ? null : rootCertsPem,
            TlsServerName = string.IsNullOrEmpty(tlsServerName) ? null : tlsServerName,
        });
    }

    /// <summary>The personas the daemon serves, for a persona dropdown (PersonaInfo.Id is what
    /// NpcSpeaker.persona takes; MetadataJson holds voice_id, emotion_tags ...). It waits for
    /// the daemon's answer, up to timeoutMs: call it from a menu or a loading screen, not every
    /// frame. Throws NpcdUnavailableException (its Code: 14 not running) when none comes.</summary>
    public PersonaInfo[] ListPersonas(uint timeoutMs = 2000)
    {
        return Client.ListPersonas(timeoutMs);
    }

    void Update()
    {
        Client.Poll();
    }

    void OnDestroy()
    {
        if (Instance != this) return;
        Client.Dispose();
        Client = null;
        Instance = null;
    }
}
