using Godot;

namespace NpcdGodot
{
    /// <summary>The project settings of the addon (Project Settings, section "npcd").</summary>
    public static class NpcdSettings
    {
        public const string Address = "npcd/connection/address";
        public const string InitialBackoffMs = "npcd/connection/initial_backoff_ms";
        public const string MaxBackoffMs = "npcd/connection/max_backoff_ms";
        /// <summary>The daemon's bearer token; empty: the NPCD_TOKEN environment variable, else none.</summary>
        public const string Token = "npcd/security/token";
        public const string UseTls = "npcd/security/use_tls";
        /// <summary>A PEM file (res:// or absolute) of the roots the daemon's certificate is checked against; empty: the system's.</summary>
        public const string RootCertsPemPath = "npcd/security/root_certs_pem_path";
        public const string TlsServerName = "npcd/security/tls_server_name";

        public static void Register()
        {
            Add(Address, "127.0.0.1:50051", Variant.Type.String);
            Add(InitialBackoffMs, 250, Variant.Type.Int);
            Add(MaxBackoffMs, 5000, Variant.Type.Int);
            Add(Token, "", Variant.Type.String);
            Add(UseTls, false, Variant.Type.Bool);
            Add(RootCertsPemPath, "", Variant.Type.String);
            Add(TlsServerName, "", Variant.Type.String);
        }

        private static void Add(string name, Variant value, Variant.Type type)
        {
            if (!ProjectSettings.HasSetting(name)) ProjectSettings.SetSetting(name, value);
            ProjectSettings.SetInitialValue(name, value);
            ProjectSettings.AddPropertyInfo(new Godot.Collections.Dictionary
            {
                { "name", name },
                { "type", (int)type },
            });
        }
    }
}
